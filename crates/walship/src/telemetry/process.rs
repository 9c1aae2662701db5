//! The process's own metrics, under the names every Prometheus client library uses
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, …), and `walship_build_info`.
//!
//! Invariant: read from `/proc/self` when a scraper asks, never on the hot path; a file that
//! cannot be read (not Linux, a restricted `/proc`) leaves its metrics out instead of reporting
//! a made-up value.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

/// What `/proc/self` says about the process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ProcessStats {
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub resident_bytes: u64,
    /// Virtual memory size, bytes.
    pub virtual_bytes: u64,
    /// Threads (walship's runtime and librdkafka's).
    pub threads: u64,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

/// Parses `/proc/self/stat` given the clock tick rate, the page size and the boot time
/// (`btime` of `/proc/stat`); `None` when the text is not what Linux writes.
pub(crate) fn parse_stat(
    stat: &str,
    ticks: f64,
    page: u64,
    boot_time: u64,
) -> Option<ProcessStats> {
    // "pid (comm) state ...": comm may hold spaces and parentheses; fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // proc(5) numbers the fields from 1 with pid and comm first: field n is fields[n - 3].
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let (utime, stime) = (field(14)?, field(15)?);
    Some(ProcessStats {
        cpu_seconds: (utime + stime) as f64 / ticks,
        threads: field(20)?,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page,
    })
}

/// `btime` (the boot time, Unix seconds) of `/proc/stat`.
pub(crate) fn parse_boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of open files in `/proc/self/limits` (`None` when unlimited or unreadable).
pub(crate) fn parse_max_fds(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l["Max open files".len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `sysconf(name)`, when the system answers.
#[allow(unsafe_code)]
fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf takes a constant and reads no memory of ours.
    let v = unsafe { libc::sysconf(name) };
    u64::try_from(v).ok().filter(|&v| v > 0)
}

/// This process's statistics now.
fn read_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = parse_boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
    parse_stat(
        &stat,
        sysconf(libc::_SC_CLK_TCK)? as f64,
        sysconf(libc::_SC_PAGESIZE)?,
        boot,
    )
}

/// Open file descriptors now.
fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// The process metrics and `walship_build_info`, read at each scrape.
#[derive(Debug)]
pub(crate) struct ProcessCollector;

/// The values of `walship_build_info`'s labels: the version, the git commit it was built from
/// (`unknown` outside a git checkout) and the compiler's version.
pub fn build_info() -> [(&'static str, &'static str); 3] {
    [
        ("version", env!("CARGO_PKG_VERSION")),
        ("git_commit", env!("WALSHIP_GIT_COMMIT")),
        ("rustc", env!("WALSHIP_RUSTC_VERSION")),
    ]
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: Option<f64>,
) -> fmt::Result {
    let Some(value) = value else { return Ok(()) };
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let mut info = encoder.encode_descriptor(
            "walship_build_info",
            "1, labelled with walship's version, the git commit it was built from and the rustc that built it.",
            None,
            MetricType::Gauge,
        )?;
        info.encode_family(&build_info().to_vec())?
            .encode_gauge(&1u64)?;
        let stats = read_stats();
        if let Some(s) = stats {
            let mut cpu = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?;
            cpu.encode_counter::<NoLabelSet, _, u64>(&s.cpu_seconds, None)?;
        }
        let e = &mut encoder;
        gauge(
            e,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            stats.map(|s| s.resident_bytes as f64),
        )?;
        gauge(
            e,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            stats.map(|s| s.virtual_bytes as f64),
        )?;
        gauge(
            e,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            stats.map(|s| s.start_time_seconds),
        )?;
        gauge(
            e,
            "process_threads",
            "Number of OS threads in the process.",
            stats.map(|s| s.threads as f64),
        )?;
        gauge(
            e,
            "process_open_fds",
            "Number of open file descriptors.",
            open_fds().map(|n| n as f64),
        )?;
        gauge(
            e,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            std::fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|l| parse_max_fds(&l))
                .map(|n| n as f64),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with spaces and a parenthesis, as Linux writes it.
        let stat = "4242 (walship (x) y) S 1 4242 4242 0 -1 4194304 99 0 1 0 250 150 0 0 20 0 \
                    7 0 321046 3133440 407 18446744073709551615 0 0";
        let s = parse_stat(stat, 100.0, 4096, 1_796_565_204).unwrap();
        assert_eq!(s.cpu_seconds, 4.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.virtual_bytes, 3_133_440);
        assert_eq!(s.resident_bytes, 407 * 4096);
        assert_eq!(s.start_time_seconds, 1_796_565_204.0 + 3210.46);
        assert_eq!(parse_stat("4242 (walship) S 1", 100.0, 4096, 0), None);
    }

    #[test]
    fn boot_time_and_the_open_files_limit() {
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1796565204\nprocesses 9\n"),
            Some(1_796_565_204)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            20000                40000                files     \n";
        assert_eq!(parse_max_fds(limits), Some(20_000));
        assert_eq!(
            parse_max_fds(
                "Max open files            unlimited            unlimited            files"
            ),
            None
        );
    }

    /// On Linux the live values are there and plausible: this test process uses some memory
    /// and started before now.
    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reads_its_own_statistics() {
        let s = read_stats().expect("/proc/self/stat");
        assert!(s.resident_bytes > 1 << 20, "{s:?}");
        assert!(s.threads >= 1 && s.cpu_seconds >= 0.0, "{s:?}");
        let now = super::super::unix_ms() as f64 / 1000.0;
        assert!(
            s.start_time_seconds <= now + 1.0 && s.start_time_seconds > now - 86_400.0 * 365.0,
            "{s:?}"
        );
        assert!(open_fds().unwrap() >= 3);
    }
}
