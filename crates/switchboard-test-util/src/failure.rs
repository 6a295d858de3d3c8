//! What a failing test prints about the processes it ran: a log tail with
//! runs of repeated lines collapsed, and the panic message repeated last.
//!
//! CI shows only the end of a failing run's output. Processes dropped while
//! a test unwinds print their log tails after the panic message, so the
//! message would scroll out of view; [`repeat_panic_message`] prints it once
//! more after them.

use parking_lot::Mutex;
use std::sync::Once;

/// The last panic message of this test binary (tests run in parallel, so it
/// may belong to another test than the one unwinding; it is labelled so).
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Installs (once per process) a panic hook that remembers the message and
/// location before running the default hook.
pub fn remember_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            *LAST_PANIC.lock() = Some(format!(
                "thread '{}' {}",
                thread.name().unwrap_or("?"),
                info
            ));
            default(info);
        }));
    });
}

/// Prints the remembered panic message (if any) as the last thing a failing
/// test shows.
pub fn repeat_panic_message() {
    if let Some(msg) = LAST_PANIC.lock().as_deref() {
        eprintln!("--- the last panic of this test binary, again ---\n{msg}");
    }
}

/// How far back a repeated line is looked for: a retry loop logging two
/// or three lines per attempt collapses too.
const REPEAT_WINDOW: usize = 4;

/// The last `max` lines of `log`, where a line that differs only in its
/// leading `{"timestamp":"…",` from one of the few lines shown just before
/// it is not shown again but counted on that line.
pub fn log_tail(log: &str, max: usize) -> String {
    let mut runs: Vec<(&str, usize)> = Vec::new();
    for line in log.lines() {
        let key = without_timestamp(line);
        let from = runs.len().saturating_sub(REPEAT_WINDOW);
        match runs[from..]
            .iter_mut()
            .find(|(shown, _)| without_timestamp(shown) == key)
        {
            Some((_, n)) => *n += 1,
            None => runs.push((line, 1)),
        }
    }
    let start = runs.len().saturating_sub(max);
    runs[start..]
        .iter()
        .map(|(line, n)| {
            if *n > 1 {
                format!("{line}   [×{n}, the first shown]")
            } else {
                (*line).to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn without_timestamp(line: &str) -> &str {
    line.strip_prefix("{\"timestamp\":\"")
        .and_then(|rest| rest.split_once("\","))
        .map_or(line, |(_, rest)| rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_lines_are_collapsed_and_the_tail_kept() {
        let log = "\
{\"timestamp\":\"1\",\"message\":\"start\"}
{\"timestamp\":\"2\",\"message\":\"io error\"}
{\"timestamp\":\"3\",\"message\":\"io error\"}
{\"timestamp\":\"4\",\"message\":\"io error\"}
{\"timestamp\":\"4\",\"message\":\"retrying\"}
{\"timestamp\":\"4\",\"message\":\"io error\"}
{\"timestamp\":\"4\",\"message\":\"retrying\"}
plain
{\"timestamp\":\"5\",\"message\":\"end\"}";
        assert_eq!(
            log_tail(log, 4),
            "{\"timestamp\":\"2\",\"message\":\"io error\"}   [×4, the first shown]\n\
             {\"timestamp\":\"4\",\"message\":\"retrying\"}   [×2, the first shown]\n\
             plain\n\
             {\"timestamp\":\"5\",\"message\":\"end\"}"
        );
        assert_eq!(log_tail("", 3), "");
    }
}
