//! Finding the `deno` executable and checking it is the pinned version. Lookup order: an explicit
//! path (config `KILN_DENO`), then the project's own install (`<root>/.kiln/tools/bin/deno`, put
//! there by `scripts/install-deno.sh`), then `deno` on `PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Deno release line Kiln is built and tested against (`major.minor`).
pub const REQUIRED_DENO_VERSION: &str = "2.9";

/// A `deno` executable that answered `deno --version` with the required version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenoBinary {
    path: PathBuf,
    version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DenoLookupError {
    #[error(
        "deno not found: looked at {}; run scripts/install-deno.sh or set KILN_DENO to a deno {REQUIRED_DENO_VERSION}.x binary",
        display_paths(.searched)
    )]
    NotFound { searched: Vec<PathBuf> },
    #[error("deno at {} could not be run: {error}", .path.display())]
    NotRunnable { path: PathBuf, error: String },
    #[error(
        "deno at {} is version {found}, Kiln needs {REQUIRED_DENO_VERSION}.x; run scripts/install-deno.sh or set KILN_DENO",
        .path.display()
    )]
    WrongVersion { path: PathBuf, found: String },
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

impl DenoBinary {
    /// Finds deno: `explicit` if given (and then only it), else `<project_root>/.kiln/tools/bin/deno`
    /// (`project_root` defaults to the current directory), else `deno` on `PATH`.
    pub fn locate(explicit: Option<&Path>, project_root: Option<&Path>) -> Result<Self, DenoLookupError> {
        if let Some(path) = explicit {
            if !path.is_file() {
                return Err(DenoLookupError::NotFound { searched: vec![path.to_path_buf()] });
            }
            return Self::at(path);
        }
        let root = project_root.map(Path::to_path_buf).or_else(|| std::env::current_dir().ok()).unwrap_or_default();
        let mut searched = vec![Self::project_install(&root)];
        if searched[0].is_file() {
            return Self::at(&searched[0]);
        }
        let on_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|dir| dir.join("deno")).collect::<Vec<_>>())
            .unwrap_or_default();
        match on_path.iter().find(|p| p.is_file()) {
            Some(found) => Self::at(found),
            None => {
                searched.push(PathBuf::from("deno on PATH"));
                Err(DenoLookupError::NotFound { searched })
            }
        }
    }

    /// Where `scripts/install-deno.sh` puts deno under a project root.
    pub fn project_install(root: &Path) -> PathBuf {
        root.join(".kiln").join("tools").join("bin").join("deno")
    }

    /// Checks the executable at `path` with `deno --version`.
    pub fn at(path: &Path) -> Result<Self, DenoLookupError> {
        let not_runnable = |error: String| DenoLookupError::NotRunnable { path: path.to_path_buf(), error };
        let out = Command::new(path)
            .arg("--version")
            .env("NO_COLOR", "1")
            .env("DENO_NO_UPDATE_CHECK", "1")
            .output()
            .map_err(|e| not_runnable(e.to_string()))?;
        if !out.status.success() {
            return Err(not_runnable(format!("`deno --version` exited with {}", out.status)));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let version =
            parse_version(&text).ok_or_else(|| not_runnable(format!("unrecognised version output {text:?}")))?;
        if !version_matches(&version) {
            return Err(DenoLookupError::WrongVersion { path: path.to_path_buf(), found: version });
        }
        Ok(Self { path: path.to_path_buf(), version })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The full version, e.g. `2.9.8`.
    pub fn version(&self) -> &str {
        &self.version
    }
}

/// `deno 2.9.8 (stable, release, x86_64-unknown-linux-gnu)` -> `2.9.8`.
fn parse_version(output: &str) -> Option<String> {
    let first = output.lines().next()?;
    let v = first.strip_prefix("deno ")?.split_whitespace().next()?;
    v.split('.').all(|p| !p.is_empty()).then(|| v.to_owned())
}

fn version_matches(version: &str) -> bool {
    version.strip_prefix(REQUIRED_DENO_VERSION).is_some_and(|rest| rest.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_parsed_and_pinned_to_the_minor_line() {
        assert_eq!(parse_version("deno 2.9.8 (stable, release, x86_64)\nv8 15").as_deref(), Some("2.9.8"));
        assert_eq!(parse_version("node v20"), None);
        assert!(version_matches("2.9.0") && version_matches("2.9.8"));
        assert!(!version_matches("2.10.0") && !version_matches("2.90.1") && !version_matches("1.46.3"));
    }

    #[test]
    fn explicit_path_that_does_not_exist_is_not_silently_replaced() {
        let err = DenoBinary::locate(Some(Path::new("/nonexistent/deno")), None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/deno"), "{err}");
        assert!(err.to_string().contains("install-deno.sh"), "{err}");
    }

    /// A stand-in for an old deno (one cannot be installed here): a script printing its version.
    #[test]
    fn the_wrong_version_is_rejected_naming_path_and_versions() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-old-deno");
        std::fs::write(&fake, "#!/bin/sh\necho 'deno 1.46.3 (stable, release, x86_64-unknown-linux-gnu)'\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let err = DenoBinary::locate(Some(&fake), None).unwrap_err();
        assert_eq!(err, DenoLookupError::WrongVersion { path: fake.clone(), found: "1.46.3".into() });
        let msg = err.to_string();
        assert!(msg.contains("fake-old-deno") && msg.contains("1.46.3") && msg.contains("2.9.x"), "{msg}");
    }

    #[test]
    fn a_binary_that_is_not_deno_is_rejected_naming_it() {
        let err = DenoBinary::at(Path::new("/bin/true")).unwrap_err();
        assert!(matches!(err, DenoLookupError::NotRunnable { .. }), "{err}");
        assert!(err.to_string().contains("/bin/true"), "{err}");
    }
}
