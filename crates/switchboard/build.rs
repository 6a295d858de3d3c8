//! Records what `switchboard --version` reports: the git commit, the build
//! date, the enabled cargo features, the target and the compiler.
//!
//! Nothing here may fail the build: without git (a source tarball, a Docker
//! build context without `.git`) the commit is `unknown`. Packagers can set
//! `SWITCHBOARD_GIT_COMMIT` and `SWITCHBOARD_BUILD_DATE` themselves, and
//! `SOURCE_DATE_EPOCH` (reproducible builds) fixes the date.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    for var in [
        "SWITCHBOARD_GIT_COMMIT",
        "SWITCHBOARD_BUILD_DATE",
        "SOURCE_DATE_EPOCH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    let commit = non_empty_env("SWITCHBOARD_GIT_COMMIT").unwrap_or_else(|| {
        watch_git_head();
        git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
    });
    let date = non_empty_env("SWITCHBOARD_BUILD_DATE").unwrap_or_else(|| {
        let secs = non_empty_env("SOURCE_DATE_EPOCH")
            .and_then(|s| s.parse::<u64>().ok())
            .or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs())
            });
        secs.map(utc_timestamp).unwrap_or_else(|| "unknown".into())
    });
    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| {
            k.strip_prefix("CARGO_FEATURE_")
                .map(|f| f.to_lowercase().replace('_', "-"))
        })
        .collect();
    features.sort();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());

    println!("cargo:rustc-env=SWITCHBOARD_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=SWITCHBOARD_BUILD_DATE={date}");
    if features.is_empty() {
        features.push("none".into());
    }
    println!(
        "cargo:rustc-env=SWITCHBOARD_BUILD_FEATURES={}",
        features.join(",")
    );
    println!(
        "cargo:rustc-env=SWITCHBOARD_BUILD_TARGET={}",
        std::env::var("TARGET").unwrap_or_else(|_| "unknown".into())
    );
    println!("cargo:rustc-env=SWITCHBOARD_BUILD_RUSTC={rustc_version}");
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Runs git in the package directory; `None` if git is missing, this is not
/// a checkout, or the output is empty.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(std::env::var_os("CARGO_MANIFEST_DIR")?)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// Asks cargo to run this script again when HEAD moves: a new commit on the
/// current branch, or another branch checked out. Only existing files are
/// named (a missing one would make cargo rerun the script on every build).
fn watch_git_head() {
    let mut paths = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        paths.push(branch);
    }
    for p in paths {
        if let Some(file) = git(&["rev-parse", "--path-format=absolute", "--git-path", &p]) {
            if std::path::Path::new(&file).exists() {
                println!("cargo:rerun-if-changed={file}");
            }
        }
    }
}

/// Seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC), with the
/// civil-from-days conversion of the proleptic Gregorian calendar.
fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}
