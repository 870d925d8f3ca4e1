//! Runtime knobs for `trellis-chaos` (its `control_dir` config key): one
//! file per pattern process, named after the name the proxy gave it in
//! Initialize (`chaos`, or `chaos-1` for a replica), holding `key=value`
//! lines. The replica tests use it to make one replica slow or failing
//! while the others stay well, without restarting anything.
//!
//! Both sides live here: [`ChaosControl`] writes the files in a test, and
//! the chaos binary reads them with [`Knobs::parse`] and announces each
//! change with [`applied_line`], so the two cannot drift apart.

use std::path::Path;
use std::time::Duration;

/// A folder of per-replica knob files for trellis-chaos's `control_dir`.
/// Removed when dropped.
pub struct ChaosControl {
    dir: tempfile::TempDir,
}

impl Default for ChaosControl {
    fn default() -> Self {
        Self::new()
    }
}

impl ChaosControl {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("chaos-knobs.")
            .tempdir()
            .expect("create a temporary folder for trellis-chaos knobs");
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The line of a chaos pattern's `config:` that points it here, for
    /// `ProxyBuilder::chaos(name, namespaces, &control.config())`.
    pub fn config(&self) -> String {
        format!("control_dir: {:?}", self.dir().display().to_string())
    }

    /// Writes `replica`'s knobs file. Atomic (a temporary file renamed over
    /// the old one), so the pattern never reads half a file.
    fn write(&self, replica: &str, knobs: &str) {
        let path = self.dir().join(replica);
        let tmp = self.dir().join(format!(".{replica}.tmp"));
        std::fs::write(&tmp, knobs).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &path)
            .unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), path.display()));
    }

    /// Sets the knobs of the process named `replica` (e.g.
    /// `set_and_wait(&proxy, "chaos-1", "latency=30ms")`; lines separated
    /// by `\n`; `""` clears them): writes its file, tells it with SIGUSR1
    /// (its pid from `proxy`'s admin API), and waits until `proxy`'s log
    /// shows it applied them (one more [`applied_line`] than before). The
    /// knobs must differ from the ones it has: only a change is announced.
    pub async fn set_and_wait(&self, proxy: &crate::Proxy, replica: &str, knobs: &str) {
        let line = applied_line(replica, knobs);
        let seen = proxy.log_text().matches(&line).count();
        self.write(replica, knobs);
        let pid = proxy.pattern(replica).await.pid;
        assert!(pid != 0, "{replica} has no process to tell");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .unwrap_or_else(|e| panic!("SIGUSR1 to {replica} (pid {pid}): {e}"));
        crate::eventually(&line, || async {
            (proxy.log_text().matches(&line).count() > seen).then_some(())
        })
        .await;
    }
}

/// What trellis-chaos writes to stderr (and the proxy re-emits in its log)
/// once the process named `replica` has applied `knobs`, e.g.
/// `chaos: knobs now [latency=30ms unavailable=1] on chaos-1`; cleared
/// knobs are `[]`. Lines are trimmed, empty ones dropped, and the rest
/// joined by one space, so `"latency=30ms\n"` and `"latency=30ms"` give the
/// same line. Only a change is announced: writing the same knobs again
/// logs nothing.
pub fn applied_line(replica: &str, knobs: &str) -> String {
    format!("chaos: knobs now [{}] on {replica}", normalize(knobs))
}

/// The knob lines, trimmed, without empty ones, joined by a space: what
/// counts as a change and what [`applied_line`] shows.
pub fn normalize(knobs: &str) -> String {
    knobs
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The misbehaviour one knob file asks for. A key absent from the file is
/// at its default (no latency, available).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Knobs {
    /// `latency=30ms` (humantime): every data call sleeps this long first.
    pub latency: Duration,
    /// `unavailable=1` (or `true`; `0`/`false` turn it off): every data call
    /// answers UNAVAILABLE, after the latency.
    pub unavailable: bool,
}

impl Knobs {
    /// Reads a knob file's text. Returns the knobs and one warning per line
    /// it ignored (unknown key, bad value, no `=`), each quoting the line
    /// and saying what is accepted.
    pub fn parse(text: &str) -> (Knobs, Vec<String>) {
        let mut knobs = Knobs::default();
        let mut warnings = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let Some((key, value)) = line.split_once('=') else {
                warnings.push(format!(
                    "ignoring knob line {line:?}: expected key=value, e.g. latency=30ms"
                ));
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            match key {
                "latency" => match humantime_serde::re::humantime::parse_duration(value) {
                    Ok(d) => knobs.latency = d,
                    Err(e) => warnings.push(format!(
                        "ignoring knob line {line:?}: latency must be a duration like 30ms ({e})"
                    )),
                },
                "unavailable" => match value {
                    "1" | "true" => knobs.unavailable = true,
                    "0" | "false" => knobs.unavailable = false,
                    _ => warnings.push(format!(
                        "ignoring knob line {line:?}: unavailable must be 1 or 0"
                    )),
                },
                _ => warnings.push(format!(
                    "ignoring knob line {line:?}: unknown knob {key:?} (known: latency, unavailable)"
                )),
            }
        }
        (knobs, warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_parse_and_absent_keys_are_defaults() {
        let (k, w) = Knobs::parse("latency=30ms\n unavailable = 1 \n\n");
        assert_eq!(
            k,
            Knobs {
                latency: Duration::from_millis(30),
                unavailable: true
            }
        );
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(Knobs::parse(""), (Knobs::default(), vec![]));
    }

    #[test]
    fn bad_lines_are_warned_about_and_ignored() {
        let (k, w) = Knobs::parse("latency=soon\nunavailable=yes\nspeed=9\nnonsense\nlatency=1s");
        assert_eq!(k.latency, Duration::from_secs(1));
        assert!(!k.unavailable);
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w[0].contains("\"latency=soon\""), "{}", w[0]);
        assert!(w[2].contains("unknown knob \"speed\""), "{}", w[2]);
    }

    #[test]
    fn the_applied_line_ignores_blank_lines_and_spacing() {
        assert_eq!(
            applied_line("chaos-1", "latency=30ms\n\n  unavailable=1\n"),
            "chaos: knobs now [latency=30ms unavailable=1] on chaos-1"
        );
        assert_eq!(applied_line("c", ""), "chaos: knobs now [] on c");
    }

    #[test]
    fn set_replaces_the_file_whole() {
        let c = ChaosControl::new();
        c.write("chaos-0", "latency=5ms");
        c.write("chaos-0", "unavailable=1");
        let text = std::fs::read_to_string(c.dir().join("chaos-0")).unwrap();
        assert_eq!(text, "unavailable=1");
        assert_eq!(
            std::fs::read_dir(c.dir()).unwrap().count(),
            1,
            "no temp file left"
        );
        assert!(c.config().starts_with("control_dir: \""), "{}", c.config());
    }
}
