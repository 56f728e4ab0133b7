//! The main of a test binary whose scenarios share one expensive setup (a
//! real control plane, real nodes): the setup is made once, the scenarios
//! run in order on it, and it is dropped (every namespace and process) when
//! the run ends, also when a scenario fails. It prints libtest's lines, so
//! CI counts the scenarios as tests.

use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::time::Instant;

/// A scenario on the shared setup `T`.
pub type Scenario<T> = fn(&mut T) -> anyhow::Result<()>;

/// What the run needs, and whether it may skip without it.
pub struct Run<T> {
    /// The binary's name, for the line of a setup that failed.
    pub name: &'static str,
    /// Why the run cannot go on here (no root, a build missing), if it cannot.
    pub missing: Option<String>,
    /// Makes the shared setup.
    pub start: fn() -> anyhow::Result<T>,
    /// Puts the setup back as a scenario found it, after one failed.
    pub clear: fn(&mut T),
}

/// Runs `scenarios` (filtered by the bare words of the command line) on one setup.
pub fn main<T>(run: Run<T>, scenarios: &[(&str, Scenario<T>)]) -> ExitCode {
    let started = Instant::now();
    // libtest's flags (--include-ignored, --test-threads, ...) are taken and ignored; a bare word filters.
    let filter: Vec<String> =
        std::env::args().skip(1).filter(|a| !a.starts_with('-') && !a.chars().all(|c| c.is_ascii_digit())).collect();
    let chosen: Vec<&(&str, Scenario<T>)> = scenarios
        .iter()
        .filter(|(name, _)| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", chosen.len());
    let summary = |result: &str, passed: usize, failed: usize, ignored: usize| {
        println!(
            "\ntest result: {result}. {passed} passed; {failed} failed; {ignored} ignored; 0 measured; 0 filtered out; finished in {:.2}s\n",
            started.elapsed().as_secs_f64()
        );
    };
    let skip = |why: &str| {
        for (name, _) in &chosen {
            println!("test {name} ... ignored, {why}");
        }
        summary("ok", 0, 0, chosen.len());
    };
    if chosen.is_empty() {
        skip("");
        return ExitCode::SUCCESS;
    }
    if let Some(why) = run.missing {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            println!("test {} ... FAILED: under CI=true this must run: {why}", run.name);
            summary("FAILED", 0, 1, 0);
            return ExitCode::FAILURE;
        }
        skip(&why);
        return ExitCode::SUCCESS;
    }
    let mut setup = match (run.start)() {
        Ok(setup) => setup,
        Err(e) => {
            println!("test {} ... FAILED\n{e:#}", run.name);
            summary("FAILED", 0, 1, 0);
            return ExitCode::FAILURE;
        }
    };
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, scenario) in chosen {
        let began = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| scenario(&mut setup)));
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(panic) => Some(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
            ),
        };
        match error {
            None => {
                passed += 1;
                println!("test {name} ... ok ({:.1} s)", began.elapsed().as_secs_f64());
            }
            Some(e) => {
                println!("test {name} ... FAILED ({:.1} s)", began.elapsed().as_secs_f64());
                failed.push((name, e));
                (run.clear)(&mut setup);
            }
        }
    }
    for (name, e) in &failed {
        println!("\n---- {name} ----\n{e}");
    }
    summary(if failed.is_empty() { "ok" } else { "FAILED" }, passed, failed.len(), 0);
    drop(setup);
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
