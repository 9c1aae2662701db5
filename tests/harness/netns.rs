//! A network namespace of the test's own, joined to the host by a veth pair, so a walship
//! process can be cut off from one address (the broker) while it still reaches another
//! (PostgreSQL) — what a proxy cannot fake, since Kafka clients follow the advertised listeners.
//!
//! ```text
//!  host: veth-h  10.<a>.<b>.1 (PostgreSQL)  10.<a>.<b>.3 (the broker)
//!          │
//!  netns: veth-n 10.<a>.<b>.2 ── `cut` adds a blackhole route to .3: packets vanish, as in a
//!                                 network partition (no refusal, no reset)
//! ```
//!
//! Needs root and iproute2 (`ip netns`); [`Netns::create`] says why when it cannot. Everything
//! is removed when the value is dropped.

use std::process::Command;

/// The namespace and its addresses.
pub struct Netns {
    pub name: String,
    host_if: String,
    /// The host's address for PostgreSQL, as seen from the namespace.
    pub db_addr: String,
    /// The host's address for the broker, as seen from the namespace (and the host).
    pub broker_addr: String,
    /// The namespace's own address: where its connections come from.
    pub ns_addr: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// A new namespace for this test process; `Err` says why it cannot be made here.
    pub fn create() -> Result<Netns, String> {
        let id = std::process::id();
        let (a, b) = (200 + (id >> 8) % 50, id % 256);
        let name = format!("walship-{id}");
        let (host_if, ns_if) = (format!("wsh{id}"), format!("wsn{id}"));
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            db_addr: format!("10.{a}.{b}.1"),
            broker_addr: format!("10.{a}.{b}.3"),
            ns_addr: format!("10.{a}.{b}.2"),
        };
        ip(&["netns", "add", &name])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", ns.db_addr),
            "dev",
            &host_if,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/32", ns.broker_addr),
            "dev",
            &host_if,
        ])?;
        ip(&["link", "set", &host_if, "up"])?;
        inside(&["addr", "add", &format!("{}/24", ns.ns_addr), "dev", &ns_if])?;
        inside(&["link", "set", &ns_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        inside(&[
            "route",
            "add",
            &format!("{}/32", ns.broker_addr),
            "dev",
            &ns_if,
        ])?;
        Ok(ns)
    }

    /// The command that runs `program` inside the namespace (`ip netns exec` execs it, so its
    /// PID is the program's).
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Cuts the namespace off from the broker's address: packets to it vanish.
    pub fn cut(&self) {
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "route",
            "replace",
            "blackhole",
            &self.broker_addr,
        ])
        .expect("cut the broker off");
    }

    /// Undoes [`Netns::cut`].
    pub fn heal(&self) {
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "route",
            "replace",
            &format!("{}/32", self.broker_addr),
            "dev",
            &self.host_if.replace("wsh", "wsn"),
        ])
        .expect("heal the cut");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
