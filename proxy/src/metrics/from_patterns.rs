//! Each pattern's own metrics in the proxy's scrape: at scrape time the
//! proxy asks every pattern with a live process for its metrics
//! (`Lifecycle/Metrics`, docs/pattern-protocol.md), concurrently, each
//! bounded by [`SCRAPE_TIMEOUT`], and merges the answers into its own
//! exposition with `pattern="<name>"` added to every sample. One scrape
//! target per Trellis.
//!
//! The merge reads what a pattern sends as outside data: Prometheus text
//! 0.0.4 or OpenMetrics text, each line checked (names, label syntax and
//! escapes, values). A text with a malformed line is left out whole (half
//! a histogram would be wrong), and so is a pattern that does not answer in
//! time; both count in `trellis_pattern_scrape_errors_total{pattern}` and
//! are logged at debug. A pattern answering UNIMPLEMENTED has no metrics
//! and contributes nothing, which is no error.
//!
//! Families are keyed by name: several patterns sending the same family
//! (every SDK pattern sends `pattern_backend_operation_duration_seconds`)
//! give one `# HELP`/`# TYPE` and the samples of each pattern after it. The
//! output is written in the format of the scrape (a counter's `# TYPE`
//! names its `_total` series in 0.0.4; `# UNIT`, `_created` samples and
//! exemplars only in OpenMetrics). Sample timestamps are dropped: the
//! figures are as fresh as the scrape.

use std::collections::HashMap;
use std::fmt::Write;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing::debug;
use trellis_proto::pattern::v1::MetricsRequest;
use trellis_proto::pattern::v1::lifecycle_client::LifecycleClient;

use std::sync::Arc;

use tokio::sync::watch;

use crate::supervisor::Roster;
use crate::supervisor::State;

/// How long one pattern may take to answer `Lifecycle/Metrics`.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);

/// The label the proxy adds to every sample of a pattern.
const PATTERN_LABEL: &str = "pattern";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PatternLabels {
    pattern: String,
}

/// Asks the patterns for their metrics; owns
/// `trellis_pattern_scrape_errors_total`.
pub struct FromPatterns {
    roster: watch::Receiver<Arc<Roster>>,
    errors: Family<PatternLabels, Counter>,
}

impl FromPatterns {
    /// Registers the error counter in `registry`, with a zero series per
    /// pattern so a rate works from the first scrape.
    pub fn new(roster: watch::Receiver<Arc<Roster>>, registry: &mut Registry) -> Self {
        let errors = Family::<PatternLabels, Counter>::default();
        for h in roster.borrow().patterns() {
            let _ = errors.get_or_create(&PatternLabels {
                pattern: h.name().to_string(),
            });
        }
        registry.register(
            "trellis_pattern_scrape_errors",
            "Scrapes in which a pattern's own metrics were left out: no answer within 1 s, an \
             error, or a malformed text",
            errors.clone(),
        );
        FromPatterns { roster, errors }
    }

    /// Every pattern's metrics, merged. Patterns without a live process are
    /// not asked. Call it before rendering the proxy's own metrics, so the
    /// errors of this scrape are counted in it.
    pub async fn scrape(&self) -> Scraped {
        let roster = self.roster.borrow().clone();
        for h in roster.patterns() {
            // A pattern a reload added gets its zero series too.
            let _ = self.errors.get_or_create(&PatternLabels {
                pattern: h.name().to_string(),
            });
        }
        let asks = roster.patterns().iter().filter_map(|h| {
            let control = h.with_status(|s| {
                matches!(s.state, State::Serving | State::NotServing)
                    .then(|| s.control.clone())
                    .flatten()
            })?;
            Some(async move { (h.name(), ask(control).await) })
        });
        let answers = futures::future::join_all(asks).await;
        let mut merged = Scraped::default();
        for (name, answer) in answers {
            let text = match answer {
                Answer::Text(text) => text,
                Answer::None => continue,
                Answer::Failed(why) => {
                    debug!(pattern = name, %why, "pattern metrics left out of this scrape");
                    self.count_error(name);
                    continue;
                }
            };
            if let Err(why) = merged.add(name, &text) {
                debug!(pattern = name, %why, "pattern metrics left out of this scrape");
                self.count_error(name);
            }
        }
        merged
    }

    fn count_error(&self, pattern: &str) {
        self.errors
            .get_or_create(&PatternLabels {
                pattern: pattern.to_string(),
            })
            .inc();
    }
}

enum Answer {
    Text(String),
    /// UNIMPLEMENTED: the pattern has no metrics.
    None,
    Failed(String),
}

async fn ask(control: crate::supervisor::secret::Control) -> Answer {
    let mut client = LifecycleClient::new(control);
    let mut request = tonic::Request::new(MetricsRequest {});
    request.set_timeout(SCRAPE_TIMEOUT);
    match tokio::time::timeout(SCRAPE_TIMEOUT, client.metrics(request)).await {
        Ok(Ok(response)) => Answer::Text(response.into_inner().text),
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => Answer::None,
        Ok(Err(status)) => Answer::Failed(format!(
            "Lifecycle/Metrics failed: {}: {}",
            status.code(),
            status.message()
        )),
        Err(_) => Answer::Failed(format!(
            "Lifecycle/Metrics got no answer within {}",
            humantime::format_duration(SCRAPE_TIMEOUT)
        )),
    }
}

/// The patterns' metric families, merged, ready to be written after the
/// proxy's own.
#[derive(Debug, Default)]
pub struct Scraped {
    families: Vec<Merged>,
    /// Family name → index in `families`.
    index: HashMap<String, usize>,
}

#[derive(Debug)]
struct Merged {
    name: String,
    kind: Kind,
    help: Option<String>,
    unit: Option<String>,
    samples: Vec<Sample>,
}

/// One sample, checked, with the pattern label already added.
#[derive(Debug)]
struct Sample {
    name: String,
    /// `a="1",b="2",pattern="p"`: already escaped.
    labels: String,
    value: String,
    /// ` # {…} v`, OpenMetrics only.
    exemplar: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    GaugeHistogram,
    Summary,
    StateSet,
    Info,
    Unknown,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "counter" => Kind::Counter,
            "gauge" => Kind::Gauge,
            "histogram" => Kind::Histogram,
            "gaugehistogram" => Kind::GaugeHistogram,
            "summary" => Kind::Summary,
            "stateset" => Kind::StateSet,
            "info" => Kind::Info,
            "unknown" | "untyped" => Kind::Unknown,
            _ => return None,
        })
    }

    /// The suffixes a sample of this family may add to its name.
    fn suffixes(self) -> &'static [&'static str] {
        match self {
            Kind::Counter => &["_total", "_created"],
            Kind::Histogram => &["_bucket", "_count", "_sum", "_created"],
            Kind::GaugeHistogram => &["_bucket", "_gcount", "_gsum"],
            Kind::Summary => &["_count", "_sum", "_created"],
            Kind::Info => &["_info"],
            Kind::Gauge | Kind::StateSet | Kind::Unknown => &[],
        }
    }

    fn openmetrics(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::GaugeHistogram => "gaugehistogram",
            Kind::Summary => "summary",
            Kind::StateSet => "stateset",
            Kind::Info => "info",
            Kind::Unknown => "unknown",
        }
    }

    /// The 0.0.4 type; `None` for a family 0.0.4 cannot express.
    fn prometheus(self) -> Option<&'static str> {
        match self {
            Kind::Counter => Some("counter"),
            Kind::Gauge | Kind::StateSet | Kind::Info => Some("gauge"),
            Kind::Histogram => Some("histogram"),
            Kind::Summary => Some("summary"),
            Kind::Unknown => Some("untyped"),
            Kind::GaugeHistogram => None,
        }
    }
}

/// One family as a pattern's text declares it, while parsing.
struct Parsed {
    /// The name on its `# HELP`/`# TYPE` lines, as written.
    meta_name: String,
    /// The family's name: `meta_name` without a counter's `_total`.
    name: String,
    kind: Kind,
    help: Option<String>,
    unit: Option<String>,
    samples: Vec<Sample>,
}

impl Parsed {
    fn new(meta_name: &str) -> Self {
        Parsed {
            meta_name: meta_name.to_string(),
            name: meta_name.to_string(),
            kind: Kind::Unknown,
            help: None,
            unit: None,
            samples: Vec::new(),
        }
    }

    fn owns(&self, sample: &str) -> bool {
        match sample.strip_prefix(self.name.as_str()) {
            Some("") => true,
            Some(suffix) => self.kind.suffixes().contains(&suffix),
            None => false,
        }
    }
}

impl Scraped {
    /// Adds the metrics `text` of pattern `pattern`: all of it, or nothing
    /// (with the reason) when a line is malformed.
    pub fn add(&mut self, pattern: &str, text: &str) -> Result<(), String> {
        let families = parse(text, pattern)?;
        for f in families {
            match self.index.get(&f.name) {
                Some(&i) => {
                    let merged = &mut self.families[i];
                    if merged.kind != f.kind {
                        debug!(
                            pattern,
                            family = %f.name,
                            kind = f.kind.openmetrics(),
                            first = merged.kind.openmetrics(),
                            "a pattern's metric family has another type than the same family \
                             from an earlier pattern; left out"
                        );
                        continue;
                    }
                    merged.help = merged.help.take().or(f.help);
                    merged.unit = merged.unit.take().or(f.unit);
                    merged.samples.extend(f.samples);
                }
                None => {
                    self.index.insert(f.name.clone(), self.families.len());
                    self.families.push(Merged {
                        name: f.name,
                        kind: f.kind,
                        help: f.help,
                        unit: f.unit,
                        samples: f.samples,
                    });
                }
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.families.is_empty()
    }

    /// Writes the merged families into `exposition` (the proxy's own,
    /// rendered as OpenMetrics when `openmetrics`): before a closing
    /// `# EOF`, which stays last. A family the proxy itself exports is
    /// left out, so no family appears twice.
    pub fn append_to(&self, exposition: &mut String, openmetrics: bool) {
        let own: std::collections::HashSet<&str> = exposition
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let mut out = String::new();
        for f in &self.families {
            let taken = [
                f.name.clone(),
                format!("{}_total", f.name),
                format!("{}_info", f.name),
            ];
            if taken.iter().any(|n| own.contains(n.as_str())) {
                debug!(family = %f.name, "a pattern's metric family has the name of one of the proxy's; left out");
                continue;
            }
            f.write(&mut out, openmetrics);
        }
        const EOF: &str = "# EOF\n";
        match exposition.strip_suffix(EOF).map(str::len) {
            Some(end) => exposition.insert_str(end, &out),
            None => exposition.push_str(&out),
        }
    }
}

impl Merged {
    fn write(&self, out: &mut String, openmetrics: bool) {
        // `write!` to a String cannot fail.
        if openmetrics {
            if let Some(help) = &self.help {
                let _ = writeln!(out, "# HELP {} {}", self.name, escape_help(help, true));
            }
            let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind.openmetrics());
            if let Some(unit) = &self.unit {
                let _ = writeln!(out, "# UNIT {} {unit}", self.name);
            }
        } else {
            let Some(kind) = self.kind.prometheus() else {
                debug!(family = %self.name, "a gauge histogram cannot be written in the Prometheus text format; left out");
                return;
            };
            let meta = match self.kind {
                Kind::Counter => format!("{}_total", self.name),
                Kind::Info => format!("{}_info", self.name),
                _ => self.name.clone(),
            };
            if let Some(help) = &self.help {
                let _ = writeln!(out, "# HELP {meta} {}", escape_help(help, false));
            }
            let _ = writeln!(out, "# TYPE {meta} {kind}");
        }
        for s in &self.samples {
            if !openmetrics && s.name.ends_with("_created") && s.name != self.name {
                continue;
            }
            // A counter's samples are `_total` in both formats.
            let name = if self.kind == Kind::Counter && s.name == self.name {
                format!("{}_total", s.name)
            } else {
                s.name.clone()
            };
            let _ = write!(out, "{name}{{{}}} {}", s.labels, s.value);
            if openmetrics && let Some(exemplar) = &s.exemplar {
                let _ = write!(out, " {exemplar}");
            }
            out.push('\n');
        }
    }
}

/// `# HELP` text, escaped for the format: backslash and newline in both,
/// also the double quote in OpenMetrics.
fn escape_help(help: &str, openmetrics: bool) -> String {
    let mut out = String::with_capacity(help.len());
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if openmetrics => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

/// The families of one pattern's text, each sample labelled with
/// `pattern`; the first malformed line is an error naming it.
fn parse(text: &str, pattern: &str) -> Result<Vec<Parsed>, String> {
    let mut families: Vec<Parsed> = Vec::new();
    let pattern_label = format!("{PATTERN_LABEL}=\"{}\"", escape_label_value(pattern));
    for (i, line) in text.lines().enumerate() {
        let bad = |why: &str| {
            let shown: String = line.chars().take(120).collect();
            format!("line {}: {why}: {shown:?}", i + 1)
        };
        if line.trim().is_empty() {
            continue;
        }
        if line == "# EOF" {
            break;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            let keyword = parts.next().unwrap_or("");
            if !matches!(keyword, "HELP" | "TYPE" | "UNIT") {
                continue; // a plain comment
            }
            let name = parts.next().unwrap_or("");
            let rest = parts.next().unwrap_or("");
            if !is_metric_name(name) {
                return Err(bad("not a metric name"));
            }
            let family = match families.last_mut() {
                Some(f) if f.meta_name == name => f,
                _ => {
                    families.push(Parsed::new(name));
                    families.last_mut().ok_or_else(|| bad("internal"))?
                }
            };
            match keyword {
                "HELP" => family.help = Some(unescape_help(rest)),
                "TYPE" => {
                    let kind = Kind::parse(rest.trim()).ok_or_else(|| bad("unknown type"))?;
                    family.kind = kind;
                    if kind == Kind::Counter
                        && let Some(base) = name.strip_suffix("_total")
                    {
                        family.name = base.to_string();
                    }
                }
                _ => family.unit = Some(rest.trim().to_string()),
            }
            continue;
        }
        let sample = parse_sample(line, &pattern_label).map_err(|why| bad(&why))?;
        match families.last_mut() {
            Some(f) if f.owns(&sample.name) => f.samples.push(sample),
            _ => {
                let mut f = Parsed::new(&sample.name);
                f.samples.push(sample);
                families.push(f);
            }
        }
    }
    Ok(families)
}

/// `name{labels} value [timestamp] [# exemplar]`, checked; the timestamp
/// is dropped and `pattern_label` added (a label of the pattern's own
/// named `pattern` becomes `exported_pattern`, as Prometheus does).
fn parse_sample(line: &str, pattern_label: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err("not a metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = String::new();
    let mut seen: Vec<String> = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find('=').ok_or("a label without a value")?;
            let mut label = rest[..eq].trim().to_string();
            if !is_label_name(&label) {
                return Err("not a label name".into());
            }
            rest = rest[eq + 1..].trim_start();
            let value_len = quoted_len(rest).ok_or("a label value that is not a quoted string")?;
            let value = &rest[..value_len];
            rest = rest[value_len..].trim_start();
            if label == PATTERN_LABEL {
                label = format!("exported_{PATTERN_LABEL}");
            }
            if seen.contains(&label) {
                return Err(format!("label {label:?} twice"));
            }
            if !labels.is_empty() {
                labels.push(',');
            }
            labels.push_str(&label);
            labels.push('=');
            labels.push_str(value);
            seen.push(label);
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if !rest.starts_with('}') {
                return Err("labels not separated by a comma".into());
            }
        }
    }
    if !labels.is_empty() {
        labels.push(',');
    }
    labels.push_str(pattern_label);

    let (values, exemplar) = match rest.split_once(" # ") {
        Some((v, e)) => (v, Some(format!("# {}", e.trim()))),
        None => (rest, None),
    };
    let mut fields = values.split_ascii_whitespace();
    let value = fields.next().ok_or("no value")?;
    if value.parse::<f64>().is_err() {
        return Err("a value that is not a number".into());
    }
    if let Some(ts) = fields.next()
        && ts.parse::<f64>().is_err()
    {
        return Err("a timestamp that is not a number".into());
    }
    if fields.next().is_some() {
        return Err("extra fields after the value".into());
    }
    if let Some(e) = &exemplar
        && !e[1..].trim_start().starts_with('{')
    {
        return Err("an exemplar without labels".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value: value.to_string(),
        exemplar,
    })
}

/// The length of the quoted string at the start of `s`, quotes included,
/// if it is one with only `\\`, `\"` and `\n` escapes.
fn quoted_len(s: &str) -> Option<usize> {
    let mut chars = s.char_indices();
    if chars.next()?.1 != '"' {
        return None;
    }
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some(i + 1),
            '\\' => match chars.next()?.1 {
                '\\' | '"' | 'n' => {}
                _ => return None,
            },
            '\n' => return None,
            _ => {}
        }
    }
    None
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn unescape_help(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What two SDK patterns send (OpenMetrics-style, from
    /// prometheus-client's `encode_registry`).
    const SDK: &str = "\
# HELP pattern_backend_operation_duration_seconds Duration of backend operations.
# TYPE pattern_backend_operation_duration_seconds histogram
pattern_backend_operation_duration_seconds_sum{operation=\"GET\",outcome=\"ok\"} 0.5
pattern_backend_operation_duration_seconds_count{operation=\"GET\",outcome=\"ok\"} 3
pattern_backend_operation_duration_seconds_bucket{le=\"0.001\",operation=\"GET\",outcome=\"ok\"} 1
pattern_backend_operation_duration_seconds_bucket{le=\"+Inf\",operation=\"GET\",outcome=\"ok\"} 3
# HELP pattern_pool_waits Requests that waited.
# TYPE pattern_pool_waits counter
pattern_pool_waits_total 7
# HELP pattern_subscriptions Open subscriptions.
# TYPE pattern_subscriptions gauge
pattern_subscriptions 1
";

    fn merged(texts: &[(&str, &str)]) -> Scraped {
        let mut s = Scraped::default();
        for (p, t) in texts {
            s.add(p, t).unwrap();
        }
        s
    }

    fn render(s: &Scraped, own: &str, openmetrics: bool) -> String {
        let mut out = own.to_string();
        s.append_to(&mut out, openmetrics);
        out
    }

    #[test]
    fn every_sample_gets_the_pattern_label() {
        let out = render(&merged(&[("cache", SDK)]), "", true);
        assert!(
            out.contains(
                "pattern_backend_operation_duration_seconds_count{operation=\"GET\",outcome=\"ok\",pattern=\"cache\"} 3\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("pattern_backend_operation_duration_seconds_bucket{le=\"+Inf\",operation=\"GET\",outcome=\"ok\",pattern=\"cache\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("pattern_pool_waits_total{pattern=\"cache\"} 7\n"),
            "{out}"
        );
        assert!(
            out.contains("pattern_subscriptions{pattern=\"cache\"} 1\n"),
            "{out}"
        );
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains("pattern=\"cache\"}"), "{line}");
        }
    }

    #[test]
    fn families_from_several_patterns_are_declared_once() {
        let out = render(&merged(&[("a", SDK), ("b", SDK)]), "", true);
        for family in [
            "pattern_backend_operation_duration_seconds",
            "pattern_pool_waits",
            "pattern_subscriptions",
        ] {
            let types = out
                .lines()
                .filter(|l| l.starts_with(&format!("# TYPE {family} ")))
                .count();
            let helps = out
                .lines()
                .filter(|l| l.starts_with(&format!("# HELP {family} ")))
                .count();
            assert_eq!((types, helps), (1, 1), "{family} in {out}");
        }
        // Each family's samples follow its declaration, pattern by pattern.
        let lines: Vec<&str> = out.lines().collect();
        let at = |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap();
        assert!(at("# TYPE pattern_pool_waits ") < at("pattern_pool_waits_total{pattern=\"a\"}"));
        assert_eq!(
            at("pattern_pool_waits_total{pattern=\"a\"}") + 1,
            at("pattern_pool_waits_total{pattern=\"b\"}")
        );
        assert!(at("pattern_pool_waits_total{pattern=\"b\"}") < at("# TYPE pattern_subscriptions"));
    }

    #[test]
    fn the_prometheus_text_format_names_counters_by_their_total() {
        let out = render(&merged(&[("a", SDK)]), "", false);
        assert!(
            out.contains("# TYPE pattern_pool_waits_total counter\n"),
            "{out}"
        );
        assert!(
            out.contains("# HELP pattern_pool_waits_total Requests that waited.\n"),
            "{out}"
        );
        assert!(!out.contains("# EOF"), "{out}");
        // And a pattern that sent 0.0.4 is read the same way.
        let text = "# HELP jobs_total Jobs.\n# TYPE jobs_total counter\njobs_total 2\n";
        let out = render(&merged(&[("a", text)]), "", true);
        assert!(
            out.contains("# TYPE jobs counter\njobs_total{pattern=\"a\"} 2\n"),
            "{out}"
        );
    }

    #[test]
    fn eof_stays_last() {
        let own = "# TYPE up gauge\nup 1\n# EOF\n";
        let out = render(&merged(&[("a", SDK)]), own, true);
        assert!(
            out.starts_with("# TYPE up gauge\nup 1\n# HELP pattern_backend"),
            "{out}"
        );
        assert!(
            out.ends_with("pattern_subscriptions{pattern=\"a\"} 1\n# EOF\n"),
            "{out}"
        );
        assert_eq!(out.matches("# EOF").count(), 1);
        // A pattern's own EOF ends its text and is not copied.
        let out = render(&merged(&[("a", "x 1\n# EOF\ny 2\n")]), own, true);
        assert!(out.ends_with("x{pattern=\"a\"} 1\n# EOF\n"), "{out}");
    }

    #[test]
    fn label_values_are_kept_escaped_and_the_pattern_name_is_escaped() {
        let text = "m{path=\"a\\\"b\\\\c\\nd\",x=\"}{,\"} 1\n";
        let out = render(&merged(&[("we\"ird\\", text)]), "", true);
        assert!(
            out.contains("m{path=\"a\\\"b\\\\c\\nd\",x=\"}{,\",pattern=\"we\\\"ird\\\\\"} 1\n"),
            "{out}"
        );
    }

    #[test]
    fn a_pattern_label_of_the_pattern_is_renamed() {
        let out = render(&merged(&[("a", "m{pattern=\"own\"} 1\n")]), "", true);
        assert!(
            out.contains("m{exported_pattern=\"own\",pattern=\"a\"} 1\n"),
            "{out}"
        );
    }

    #[test]
    fn timestamps_are_dropped_and_exemplars_kept_for_openmetrics_only() {
        let text = "# TYPE c counter\nc_total 3 1700000000 # {trace_id=\"abc\"} 1.0\n";
        let om = render(&merged(&[("a", text)]), "", true);
        assert!(
            om.contains("c_total{pattern=\"a\"} 3 # {trace_id=\"abc\"} 1.0\n"),
            "{om}"
        );
        let prom = render(&merged(&[("a", text)]), "", false);
        assert!(prom.contains("c_total{pattern=\"a\"} 3\n"), "{prom}");
    }

    #[test]
    fn a_malformed_text_is_left_out_whole_and_the_rest_stays() {
        let mut s = Scraped::default();
        s.add("good", SDK).unwrap();
        for bad in [
            "m{a=\"1\" 1\n",          // unclosed labels
            "m{a=1} 1\n",             // unquoted value
            "m{a=\"\\x\"} 1\n",       // bad escape
            "m{1a=\"x\"} 1\n",        // bad label name
            "m{a=\"1\",a=\"2\"} 1\n", // same label twice
            "m one\n",                // not a number
            "m 1 2 3\n",              // extra fields
            "9m 1\n",                 // bad metric name
            "m\n",                    // no value
            "# TYPE m bogus\nm 1\n",  // unknown type
        ] {
            let text = format!("ok_before 1\n{bad}");
            let err = s.add("bad", &text).unwrap_err();
            assert!(err.starts_with("line 2: "), "{bad:?}: {err}");
        }
        let out = render(&s, "", true);
        assert!(!out.contains("pattern=\"bad\""), "{out}");
        assert!(!out.contains("ok_before"), "{out}");
        assert!(
            out.contains("pattern_subscriptions{pattern=\"good\"} 1"),
            "{out}"
        );
    }

    #[test]
    fn a_family_of_another_type_or_one_the_proxy_exports_is_left_out() {
        let s = merged(&[
            ("a", "# TYPE m gauge\nm 1\n"),
            ("b", "# TYPE m counter\nm_total 1\n"),
            (
                "b",
                "# TYPE trellis_pattern_up gauge\ntrellis_pattern_up 5\n",
            ),
        ]);
        let own = "# TYPE trellis_pattern_up gauge\ntrellis_pattern_up{pattern=\"a\"} 1\n";
        let out = render(&s, own, false);
        assert!(out.contains("m{pattern=\"a\"} 1\n"), "{out}");
        assert!(!out.contains("m_total"), "{out}");
        assert!(!out.contains("trellis_pattern_up 5"), "{out}");
        assert!(!out.contains("trellis_pattern_up{pattern=\"b\"}"), "{out}");
    }

    #[test]
    fn untyped_samples_and_comments() {
        let text = "# a comment\nfoo 1\nbar{x=\"1\"} 2.5e3\n# HELP baz Multi\\nline \\\\ help\n# TYPE baz untyped\nbaz NaN\n";
        let om = render(&merged(&[("a", text)]), "", true);
        assert!(om.contains("foo{pattern=\"a\"} 1\n"), "{om}");
        assert!(om.contains("bar{x=\"1\",pattern=\"a\"} 2.5e3\n"), "{om}");
        assert!(
            om.contains(
                "# HELP baz Multi\\nline \\\\ help\n# TYPE baz unknown\nbaz{pattern=\"a\"} NaN\n"
            ),
            "{om}"
        );
        let prom = render(&merged(&[("a", text)]), "", false);
        assert!(prom.contains("# TYPE baz untyped\n"), "{prom}");
    }

    /// The SDK's real output, end to end through the merge.
    #[test]
    fn prometheus_client_output_round_trips() {
        use prometheus_client::metrics::gauge::Gauge;
        use prometheus_client::metrics::histogram::Histogram;
        let mut registry = Registry::default();
        let h = Histogram::new([0.001, 0.01]);
        h.observe(0.002);
        registry.register("lat_seconds", "Latency", h);
        let c: Counter = Counter::default();
        c.inc();
        registry.register("hits", "Hits", c);
        let g: Gauge = Gauge::default();
        registry.register("open", "Open", g);
        let mut text = String::new();
        prometheus_client::encoding::text::encode_registry(&mut text, &registry).unwrap();
        let out = render(&merged(&[("p", &text)]), "", true);
        assert!(
            out.contains("lat_seconds_count{pattern=\"p\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("lat_seconds_bucket{le=\"0.01\",pattern=\"p\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("hits_total{pattern=\"p\"} 1\n"), "{out}");
        assert!(out.contains("open{pattern=\"p\"} 0\n"), "{out}");
    }
}
