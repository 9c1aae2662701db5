//! How the kernel schedules walship's threads (`run.cpu_scheduling`).
//!
//! Owns one process-wide choice, made once on the main thread before any other thread exists:
//! every thread started afterwards (the runtime's, librdkafka's) inherits the policy, so the
//! whole process runs under it.
//!
//! Why `batch` is the default: on a host walship shares with PostgreSQL, each of walship's
//! wake-ups (a socket read, a delivery report, a broker response) may preempt whatever runs
//! on that core, and that is often the walsender, whose CPU decides how fast the slot streams.
//! `SCHED_BATCH` is the ordinary fair policy without wake-up preemption: walship still gets its
//! fair share of CPU and any idle core at once, but waits for the running task's slice to end
//! instead of taking the core from it. On the 2-core VM of the README's benchmarks it cut the
//! walsender's time spent waiting for a core during a drain from 3–5 % to 1–3 % and walship's
//! wake-ups per event by ~40 %; live latency at 5,000 events/s stayed within run-to-run noise. `normal` (`SCHED_OTHER`) is the OS default.
//!
//! Invariant: a policy that cannot be applied is reported (with what to do) and walship runs on
//! under the OS default; nothing else depends on the policy.

use std::str::FromStr;

/// `run.cpu_scheduling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuScheduling {
    /// `SCHED_BATCH`: no wake-up preemption of what already runs (the database, usually).
    #[default]
    Batch,
    /// `SCHED_OTHER`: the OS default.
    Normal,
}

impl FromStr for CpuScheduling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "batch" => Ok(Self::Batch),
            "normal" => Ok(Self::Normal),
            other => Err(format!(
                "cpu_scheduling {other:?} is not one of \"batch\", \"normal\""
            )),
        }
    }
}

impl CpuScheduling {
    /// The Linux policy number.
    #[cfg(target_os = "linux")]
    fn policy(self) -> libc::c_int {
        match self {
            Self::Batch => libc::SCHED_BATCH,
            Self::Normal => libc::SCHED_OTHER,
        }
    }

    /// Applies the policy to the calling thread, and so to every thread it starts afterwards.
    /// Call it on the main thread before the runtime and the producer start threads. `Err`
    /// says why it could not be applied and what to do.
    pub fn apply(self) -> Result<(), String> {
        #[cfg(target_os = "linux")]
        {
            set_policy(self.policy()).map_err(|e| {
                format!(
                    "cannot set the CPU scheduling policy to {self:?} ({e}); walship runs \
                     under the OS default. Set run.cpu_scheduling = \"normal\" to stop trying, \
                     or allow sched_setscheduler (a seccomp profile may forbid it)"
                )
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            match self {
                Self::Normal => Ok(()),
                Self::Batch => Err("run.cpu_scheduling = \"batch\" needs Linux (SCHED_BATCH); \
                     walship runs under the OS default: set it to \"normal\" on this system"
                    .into()),
            }
        }
    }
}

/// `sched_setscheduler(0, policy, {priority 0})`: the calling thread.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_policy(policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, initialised sched_param that outlives the call; pid 0 is the
    // calling thread; the call reads `param` and touches no other memory.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &raw const param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread's policy number.
#[cfg(all(test, target_os = "linux"))]
#[allow(unsafe_code)]
fn current_policy() -> libc::c_int {
    // SAFETY: no arguments besides pid 0 (the calling thread); no memory is touched.
    unsafe { libc::sched_getscheduler(0) }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn threads_started_after_apply_inherit_the_policy() {
        // On a thread of its own, so the test harness's threads keep their policy.
        std::thread::spawn(|| {
            CpuScheduling::Batch
                .apply()
                .expect("SCHED_BATCH needs no privilege");
            assert_eq!(current_policy(), libc::SCHED_BATCH);
            let child = std::thread::spawn(current_policy).join().expect("child");
            assert_eq!(
                child,
                libc::SCHED_BATCH,
                "a thread started afterwards inherits it"
            );
            CpuScheduling::Normal
                .apply()
                .expect("back to the default needs no privilege");
            assert_eq!(current_policy(), libc::SCHED_OTHER);
        })
        .join()
        .expect("test thread");
    }

    #[test]
    fn names_parse_and_anything_else_is_refused_with_the_choices() {
        assert_eq!("batch".parse(), Ok(CpuScheduling::Batch));
        assert_eq!("normal".parse(), Ok(CpuScheduling::Normal));
        let err = "fifo".parse::<CpuScheduling>().unwrap_err();
        assert!(err.contains("\"batch\", \"normal\""), "{err}");
    }
}
