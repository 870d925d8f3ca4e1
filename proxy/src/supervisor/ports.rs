//! Choosing where a pattern listens, and saying who holds a taken port.
//!
//! `unix` (the default) hands the pattern a socket path in this proxy
//! run's private folder (`sockets.rs`). `auto` hands the pattern `127.0.0.1:0`: the kernel picks a free port and
//! the pattern reports it in its handshake, so no conflict is possible. A
//! fixed port or a range is checked here first by binding it, so a conflict
//! is reported with the port, its holder (found through /proc) and what to
//! do, instead of as a pattern that died at start-up.

use super::sockets::Sockets;
use crate::config::{PortSpec, Transport};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// The `TRELLIS_PATTERN_LISTEN` value for one start, or why there is none.
/// Naming a taken port's holder walks every process's fds in /proc: that
/// runs on a blocking thread, so the owner task (and, with
/// `worker_threads: 1`, the whole proxy) never stalls on it.
pub async fn listen_address(
    name: &str,
    transport: Transport,
    port: PortSpec,
    sockets: &Sockets,
) -> Result<String, String> {
    match (transport, port) {
        (Transport::Unix, _) => Ok(format!("unix:{}", sockets.socket(name)?.display())),
        (Transport::Tcp, PortSpec::Auto) => Ok("127.0.0.1:0".into()),
        (Transport::Tcp, PortSpec::Fixed(p)) => {
            if is_free(p) {
                Ok(format!("127.0.0.1:{p}"))
            } else {
                let holder = tokio::task::spawn_blocking(move || holder(p))
                    .await
                    .ok()
                    .flatten();
                Err(format!(
                    "port {p} is already in use{}; free it, choose another `port`, or use \
                     `port: auto` (the default), which cannot conflict",
                    holder.map(|h| format!(" by {h}")).unwrap_or_default()
                ))
            }
        }
        (Transport::Tcp, PortSpec::Range(a, b)) => (a..=b)
            .find(|&p| is_free(p))
            .map(|p| format!("127.0.0.1:{p}"))
            .ok_or_else(|| {
                format!(
                    "every port in {a}-{b} is in use; widen the `port` range, free a port, or \
                     use `port: auto`"
                )
            }),
    }
}

/// Can the port be bound on 127.0.0.1 right now? (The listener is closed
/// again at once; the pattern binds it next.)
pub fn is_free(port: u16) -> bool {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).is_ok()
}

/// "process 1234 (redis-server)" for the process listening on `port`, if
/// /proc tells.
pub fn holder(port: u16) -> Option<String> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .find_map(|table| listening_inode(&table, port))?;
    let needle = format!("socket:[{inode}]");
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = proc_entry.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == needle) {
                let comm =
                    std::fs::read_to_string(proc_entry.path().join("comm")).unwrap_or_default();
                return Some(format!("process {pid} ({})", comm.trim()));
            }
        }
    }
    Some(format!("another process (socket inode {inode})"))
}

/// The inode of the LISTEN socket on `port` in a /proc/net/tcp table.
fn listening_inode(table: &str, port: u16) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let local = cols.get(1)?;
        let state = cols.get(3)?;
        let inode = cols.get(9)?;
        let (_, hex_port) = local.rsplit_once(':')?;
        (u16::from_str_radix(hex_port, 16).ok()? == port && *state == "0A")
            .then(|| inode.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nowhere() -> Sockets {
        Sockets::new("/nonexistent".into())
    }

    #[tokio::test]
    async fn auto_cannot_conflict() {
        assert_eq!(
            listen_address("m", Transport::Tcp, PortSpec::Auto, &nowhere())
                .await
                .unwrap(),
            "127.0.0.1:0"
        );
    }

    #[tokio::test]
    async fn a_taken_fixed_port_names_the_port_and_this_process() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let err = listen_address("m", Transport::Tcp, PortSpec::Fixed(port), &nowhere())
            .await
            .unwrap_err();
        assert!(err.contains(&format!("port {port}")), "{err}");
        assert!(
            err.contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains("port: auto"), "says what to do: {err}");
    }

    #[tokio::test]
    async fn a_range_skips_taken_ports_and_reports_exhaustion() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let err = listen_address("m", Transport::Tcp, PortSpec::Range(port, port), &nowhere())
            .await
            .unwrap_err();
        assert!(err.contains(&format!("{port}-{port}")), "{err}");
        // A range starting at the held port moves on to a free one (the
        // next port is very likely free; if not, a later one is).
        let got = listen_address(
            "m",
            Transport::Tcp,
            PortSpec::Range(port, port.saturating_add(50)),
            &nowhere(),
        )
        .await
        .unwrap();
        assert_ne!(got, format!("127.0.0.1:{port}"));
    }

    #[tokio::test]
    async fn unix_sockets_live_in_the_runs_private_folder() {
        let dir = tempfile::tempdir().unwrap();
        let sockets = Sockets::new(dir.path().join("s"));
        let got = listen_address("mem", Transport::Unix, PortSpec::Auto, &sockets)
            .await
            .unwrap();
        let run = sockets.dir().unwrap();
        assert_eq!(got, format!("unix:{}/mem-0.sock", run.display()));
        assert!(run.starts_with(dir.path().join("s")));
    }

    #[test]
    fn parses_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:2310 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1\n   1: 0100007F:2311 00000000:0000 01 00000000:00000000 00:00000000 00000000     0        0 999 1\n";
        assert_eq!(listening_inode(table, 0x2310), Some(12345));
        assert_eq!(listening_inode(table, 0x2311), None, "not LISTEN");
        assert_eq!(listening_inode(table, 1), None);
    }
}
