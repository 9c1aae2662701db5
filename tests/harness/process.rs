//! Long-lived child processes (PostgreSQL, the broker) that die with the test process.
//!
//! Children are spawned from one keeper thread that lives as long as the process, with
//! `PR_SET_PDEATHSIG`: the kernel signals them when that thread (so, the test binary) exits,
//! even on a crash or Ctrl-C. Spawning from test threads would kill them when a test ends.

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

/// Set by the panic hook [`note_failures`] installs: some test of this process failed.
static A_TEST_FAILED: AtomicBool = AtomicBool::new(false);

/// Installs (once) a panic hook that remembers a test failed, so servers keep their data
/// directories and logs for inspection.
pub fn note_failures() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            A_TEST_FAILED.store(true, Ordering::Relaxed);
            previous(info);
        }));
    });
}

/// True once a test of this process failed (or this thread is unwinding from a failure).
pub fn a_test_failed() -> bool {
    A_TEST_FAILED.load(Ordering::Relaxed) || std::thread::panicking()
}

type ExitTask = Box<dyn FnOnce() + Send>;
static AT_EXIT: Mutex<Vec<ExitTask>> = Mutex::new(Vec::new());

extern "C" fn run_exit_tasks() {
    let tasks = std::mem::take(&mut *AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
    for task in tasks {
        task();
    }
}

/// Runs `task` when the process exits: cleanup for what statics hold (they are never dropped).
#[allow(unsafe_code)]
pub fn at_exit(task: ExitTask) {
    note_failures();
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain function; it only uses statics that outlive `exit`.
    ONCE.call_once(|| unsafe {
        libc::atexit(run_exit_tasks);
    });
    AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()).push(task);
}

type Request = (Command, i32, mpsc::Sender<std::io::Result<Child>>);

fn keeper() -> &'static Mutex<mpsc::Sender<Request>> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("child-keeper".into())
            .spawn(move || {
                for (mut cmd, signal, reply) in rx {
                    let _ = reply.send(spawn_with_death_signal(&mut cmd, signal));
                }
                // The channel is held by a static: this thread never ends before the process.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn keeper thread");
        Mutex::new(tx)
    })
}

#[allow(unsafe_code)]
fn spawn_with_death_signal(cmd: &mut Command, signal: i32) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent; this runs in the
    // forked child before exec, after any uid change (which would clear the setting).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Spawns `cmd` so that it receives `signal` when the test process exits.
pub fn spawn_owned(cmd: Command, signal: i32) -> std::io::Result<Child> {
    let (tx, rx) = mpsc::channel();
    keeper()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, signal, tx))
        .expect("keeper alive");
    rx.recv().expect("keeper replied")
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// Waits until something accepts TCP connections on the port.
pub fn wait_for_port(port: u16, what: &str, timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not open port {port} within {timeout:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
