//! The conformance kit: reusable test suites a pattern author runs against
//! their pattern (feature `conformance`). See docs/writing-a-pattern.md.

pub mod idempotency;
pub mod kv;
pub mod pubsub;
mod runner;

pub use runner::{
    LIFECYCLE, Options, PatternCommand, Progress, RunError, STOP_CHECK, Suite, Target, junit,
    outcome_line, run, summary, text,
};

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

/// What one check found: `Err` says what went wrong.
pub type CheckResult = Result<(), String>;

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub name: &'static str,
    pub result: CheckResult,
    pub elapsed: Duration,
}

/// What a suite's `run_all` found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The suite, for the summary line: "kv" or "pubsub".
    pub suite: &'static str,
    pub outcomes: Vec<Outcome>,
}

impl Report {
    pub fn passed(&self) -> impl Iterator<Item = &Outcome> {
        self.outcomes.iter().filter(|o| o.result.is_ok())
    }

    pub fn failed(&self) -> impl Iterator<Item = &Outcome> {
        self.outcomes.iter().filter(|o| o.result.is_err())
    }

    pub fn all_passed(&self) -> bool {
        self.failed().next().is_none()
    }

    /// Panics with the whole report unless every check passed: for tests.
    #[track_caller]
    pub fn assert_all_passed(&self) {
        assert!(self.all_passed(), "conformance checks failed:\n{self}");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for o in &self.outcomes {
            match &o.result {
                Ok(()) => writeln!(f, "  ok    {:<30} {:>8.1?}", o.name, o.elapsed)?,
                Err(why) => writeln!(f, "  FAIL  {:<30} {:>8.1?}  {why}", o.name, o.elapsed)?,
            }
        }
        let failed = self.failed().count();
        write!(
            f,
            "{} conformance: {} passed, {failed} failed",
            self.suite,
            self.outcomes.len() - failed
        )
    }
}

/// Runs the named checks one after another and reports each; a check that
/// fails does not stop the others. Each suite's `run_all` calls this.
pub async fn run_checks<F, Fut>(
    suite: &'static str,
    names: &[&'static str],
    mut run_one: F,
) -> Report
where
    F: FnMut(&'static str) -> Fut,
    Fut: Future<Output = CheckResult>,
{
    let mut report = Report {
        suite,
        outcomes: Vec::new(),
    };
    for &name in names {
        let started = Instant::now();
        let result = run_one(name).await;
        report.outcomes.push(Outcome {
            name,
            result,
            elapsed: started.elapsed(),
        });
    }
    report
}
