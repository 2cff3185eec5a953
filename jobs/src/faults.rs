//! Fault injection for the tests of the real binary, not configuration:
//! compiled into debug builds only (a release build ignores it), read once
//! from `FLYWHEEL_TEST_FAULTS`, a comma-separated list such as
//! `train_crash_after=5,curate_pause_ms=60000`.

use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// A fresh (not resumed) training attempt fails after this many steps,
    /// as if its worker had died.
    pub train_crash_after: Option<usize>,
    /// A curation job sleeps this long between its build and its write, so
    /// a test can kill the worker in the middle of a job.
    pub curate_pause: Option<Duration>,
    /// A fresh (not resumed) training attempt sleeps this long after each
    /// step, so a test can kill its worker in the middle of a run.
    pub train_step_pause: Option<Duration>,
}

impl Faults {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut f = Faults::default();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not key=value"))?;
            let n: u64 = value
                .parse()
                .map_err(|_| format!("{key}: {value:?} is not a number"))?;
            match key {
                "train_crash_after" => f.train_crash_after = Some(n as usize),
                "curate_pause_ms" => f.curate_pause = Some(Duration::from_millis(n)),
                "train_step_pause_ms" => f.train_step_pause = Some(Duration::from_millis(n)),
                other => return Err(format!("unknown fault {other:?}")),
            }
        }
        Ok(f)
    }
}

/// The faults this process injects (none in release builds).
pub fn get() -> &'static Faults {
    static FAULTS: OnceLock<Faults> = OnceLock::new();
    FAULTS.get_or_init(|| {
        if !cfg!(debug_assertions) {
            return Faults::default();
        }
        match std::env::var("FLYWHEEL_TEST_FAULTS") {
            Ok(text) => {
                Faults::parse(&text).unwrap_or_else(|e| panic!("FLYWHEEL_TEST_FAULTS: {e}"))
            }
            Err(_) => Faults::default(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_refuse_typos() {
        let f =
            Faults::parse("train_crash_after=5, curate_pause_ms=20,train_step_pause_ms=7").unwrap();
        assert_eq!(f.train_crash_after, Some(5));
        assert_eq!(f.curate_pause, Some(Duration::from_millis(20)));
        assert_eq!(f.train_step_pause, Some(Duration::from_millis(7)));
        assert!(Faults::parse("train_crash_afterr=5").is_err());
        assert!(Faults::parse("train_crash_after=five").is_err());
    }
}
