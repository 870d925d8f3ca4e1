//! The proxy's own process metrics, under the standard names every
//! Prometheus client library uses (client_golang's process collector):
//! `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`. Beside them, `trellis_runtime_alive_tasks`:
//! the tokio tasks alive in the proxy's runtime (a task leak shows there
//! long before it shows in memory).
//!
//! prometheus-client has no built-in process collector (the Rust
//! `prometheus` crate's lives behind its own registry type), so this reads
//! Linux's /proc/self at scrape time, as client_golang does: nothing is
//! sampled between scrapes. A figure that cannot be read is left out of
//! the scrape rather than reported as 0.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Reads /proc/self at each scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// One reading of /proc/self.
#[derive(Debug, Default, PartialEq)]
pub struct Reading {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
    /// Tasks alive in the tokio runtime the reading is taken in; `None`
    /// outside a runtime.
    pub alive_tasks: Option<u64>,
}

impl Reading {
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| Stat::parse(&s));
        let ticks = clock_ticks();
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| boot_time(&s));
        Reading {
            cpu_seconds: stat
                .as_ref()
                .zip(ticks)
                .map(|(s, t)| (s.utime + s.stime) as f64 / t as f64),
            resident_bytes: stat
                .as_ref()
                .map(|s| s.rss_pages.saturating_mul(page_size())),
            virtual_bytes: stat.as_ref().map(|s| s.vsize),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .ok()
                .map(|(soft, _)| soft),
            start_time_seconds: stat
                .as_ref()
                .zip(ticks)
                .zip(boot_time)
                .map(|((s, t), boot)| boot as f64 + s.starttime as f64 / t as f64),
            alive_tasks: alive_tasks(),
        }
    }
}

/// Tasks alive (spawned, not yet finished) in the current tokio runtime;
/// `None` when called outside one. The scrape is rendered on the runtime,
/// so this is the proxy's own runtime.
fn alive_tasks() -> Option<u64> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    u64::try_from(handle.metrics().num_alive_tasks()).ok()
}

/// The fields of /proc/<pid>/stat used here (see proc(5)).
#[derive(Debug, PartialEq)]
struct Stat {
    /// Fields 14 and 15, in clock ticks.
    utime: u64,
    stime: u64,
    /// Field 22: start time after boot, in clock ticks.
    starttime: u64,
    /// Field 23, in bytes.
    vsize: u64,
    /// Field 24, in pages.
    rss_pages: u64,
}

impl Stat {
    fn parse(stat: &str) -> Option<Stat> {
        // The command name (field 2) is in parentheses and may hold spaces
        // and parentheses itself: the fields start after the last ')'.
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3, so field n is fields[n - 3].
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            starttime: field(22)?,
            vsize: field(23)?,
            rss_pages: field(24)?,
        })
    }
}

/// `btime` from /proc/stat: boot time, in seconds since the epoch.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Clock ticks per second (`_SC_CLK_TCK`), the unit of /proc's times.
fn clock_ticks() -> Option<u64> {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)
}

/// The memory page size in bytes (4096 when it cannot be read).
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .filter(|&p| p > 0)
        .unwrap_or(4096)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: Option<impl EncodeGaugeValue>,
) -> Result<(), std::fmt::Error> {
    let Some(v) = value else { return Ok(()) };
    let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = Reading::now();
        if let Some(cpu) = r.cpu_seconds {
            // Encoded as `process_cpu_seconds_total`.
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(m)?;
        }
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            r.resident_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            r.virtual_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_open_fds",
            "Number of open file descriptors.",
            r.open_fds,
        )?;
        gauge(
            &mut encoder,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            r.max_fds,
        )?;
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            r.start_time_seconds,
        )?;
        gauge(
            &mut encoder,
            "trellis_runtime_alive_tasks",
            "Tasks alive in the proxy's tokio runtime: spawned and not yet finished.",
            r.alive_tasks,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_found_after_a_command_name_with_spaces_and_parens() {
        let line = "4242 (tr (el) lis) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 3 0 12345 1048576 300 18446744073709551615";
        assert_eq!(
            Stat::parse(line),
            Some(Stat {
                utime: 250,
                stime: 50,
                starttime: 12345,
                vsize: 1_048_576,
                rss_pages: 300,
            })
        );
        assert_eq!(Stat::parse("garbage"), None);
        assert_eq!(Stat::parse("1 (x) S 1 2"), None);
    }

    #[test]
    fn boot_time_is_read_from_proc_stat() {
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
        assert_eq!(boot_time("cpu 1\n"), None);
    }

    #[test]
    fn this_process_is_read() {
        let r = Reading::now();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(r.cpu_seconds.is_some_and(|c| c >= 0.0), "{r:?}");
        assert!(r.resident_bytes.is_some_and(|b| b > 1024 * 1024), "{r:?}");
        assert!(
            r.virtual_bytes
                .zip(r.resident_bytes)
                .is_some_and(|(v, rss)| v >= rss),
            "{r:?}"
        );
        assert!(r.open_fds.is_some_and(|n| n >= 3), "{r:?}");
        assert!(
            r.max_fds.is_some_and(|n| n >= r.open_fds.unwrap_or(0)),
            "{r:?}"
        );
        // Started in the past, and not before 2020.
        assert!(
            r.start_time_seconds
                .is_some_and(|t| t <= now + 1.0 && t > 1_577_836_800.0),
            "{r:?}"
        );
        // No runtime here, so no task count.
        assert_eq!(r.alive_tasks, None, "{r:?}");
    }

    #[test]
    fn alive_tasks_are_counted_in_the_runtime_and_exported() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let before = Reading::now().alive_tasks.expect("inside a runtime");
            let (release, wait) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                let _ = wait.await;
            });
            assert_eq!(Reading::now().alive_tasks, Some(before + 1));

            let mut registry = prometheus_client::registry::Registry::default();
            registry.register_collector(Box::new(ProcessCollector));
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            assert!(
                text.contains(&format!("\ntrellis_runtime_alive_tasks {}\n", before + 1)),
                "{text}"
            );

            release.send(()).unwrap();
            task.await.unwrap();
        });
    }
}
