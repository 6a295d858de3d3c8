//! What this binary is: version, git commit, build date, cargo features,
//! target and compiler, recorded by `build.rs` at compile time.
//!
//! `switchboard --version` prints it, the startup log line carries it, and it
//! is meant to reach `/healthz` and the `switchboard_build_info` metric
//! through [`BuildInfo::labels`].

use std::fmt;

/// Facts about the build, all fixed at compile time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BuildInfo {
    /// The crate version, e.g. `0.1.0`.
    pub(crate) version: &'static str,
    /// The short git commit, or `unknown` when built without git.
    pub(crate) commit: &'static str,
    /// When `build.rs` last ran, `YYYY-MM-DDTHH:MM:SSZ` (UTC), or `unknown`.
    pub(crate) build_date: &'static str,
    /// Enabled cargo features of the `switchboard` crate, comma-separated,
    /// or `none`.
    pub(crate) features: &'static str,
    /// The target triple, e.g. `x86_64-unknown-linux-gnu`.
    pub(crate) target: &'static str,
    /// `rustc --version` of the compiler that built it.
    pub(crate) rustc: &'static str,
}

/// This binary's build.
pub(crate) const BUILD: BuildInfo = BuildInfo {
    version: env!("CARGO_PKG_VERSION"),
    commit: env!("SWITCHBOARD_BUILD_COMMIT"),
    build_date: env!("SWITCHBOARD_BUILD_DATE"),
    features: env!("SWITCHBOARD_BUILD_FEATURES"),
    target: env!("SWITCHBOARD_BUILD_TARGET"),
    rustc: env!("SWITCHBOARD_BUILD_RUSTC"),
};

/// `switchboard --version`'s text after the program name (clap prints
/// `switchboard ` first). A `const` so that clap can take it as `version`.
pub(crate) const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit:   ",
    env!("SWITCHBOARD_BUILD_COMMIT"),
    "\nbuilt:    ",
    env!("SWITCHBOARD_BUILD_DATE"),
    "\nfeatures: ",
    env!("SWITCHBOARD_BUILD_FEATURES"),
    "\ntarget:   ",
    env!("SWITCHBOARD_BUILD_TARGET"),
    "\nrustc:    ",
    env!("SWITCHBOARD_BUILD_RUSTC"),
);

impl BuildInfo {
    /// Name and value pairs, in a fixed order: the labels of the
    /// `switchboard_build_info` gauge (always 1) and the `build` object of
    /// `/healthz`. No value is empty.
    pub(crate) fn labels(&self) -> [(&'static str, &'static str); 6] {
        [
            ("version", self.version),
            ("commit", self.commit),
            ("build_date", self.build_date),
            ("features", self.features),
            ("target", self.target),
            ("rustc", self.rustc),
        ]
    }
}

impl fmt::Display for BuildInfo {
    /// One line, as logged at startup: `0.1.0 (commit 1a2b3c4d5e6f, built …)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (commit {}, built {}, features: {})",
            self.version, self.commit, self.build_date, self.features
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_never_empty_and_match_the_build() {
        let labels = BUILD.labels();
        for (name, value) in labels {
            assert!(!value.is_empty(), "{name} is empty");
            assert!(!value.contains('\n'), "{name} spans lines: {value:?}");
        }
        assert_eq!(labels[0], ("version", env!("CARGO_PKG_VERSION")));
        assert!(LONG_VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        assert!(LONG_VERSION.contains(&format!("commit:   {}", BUILD.commit)));
    }

    #[test]
    fn commit_is_hex_or_unknown_and_date_is_utc() {
        assert!(
            BUILD.commit == "unknown" || BUILD.commit.bytes().all(|b| b.is_ascii_hexdigit()),
            "{}",
            BUILD.commit
        );
        let d = BUILD.build_date;
        assert!(
            d == "unknown" || (d.len() == 20 && d.ends_with('Z') && d.as_bytes()[10] == b'T'),
            "{d}"
        );
    }
}
