//! Credentials from a file or an environment variable named in the config,
//! never written in it.

use std::fmt;
use std::path::Path;

use pattern_sdk::FieldViolation;

/// A password or token. Its `Debug` and `Display` print `***`, so it
/// cannot reach a log line by accident; [`Secret::expose`] is the one way
/// to the text.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Secret(text.into())
    }

    /// The text, for the one call that hands it to the client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The credential named by a pair of settings: `file` (its path, setting
/// `file_field`, e.g. `config.password_file`) or `env` (the name of an
/// environment variable, setting `env_field`), at most one of them.
/// `None` when neither is given. A file's one trailing newline (`\n` or
/// `\r\n`) is dropped, as `echo pw > file` and Kubernetes Secrets write
/// it. `lookup` reads the environment (tests pass their own).
pub fn read_secret(
    (file_field, file): (&str, Option<&Path>),
    (env_field, env): (&str, Option<&str>),
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, FieldViolation> {
    match (file, env) {
        (Some(_), Some(_)) => Err(FieldViolation::new(
            file_field,
            format!("give {file_field} or {env_field}, not both"),
        )),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                FieldViolation::new(
                    file_field,
                    format!(
                        "cannot read {}: {e}; the pattern runs as the proxy's user, which \
                         must be able to read it",
                        path.display()
                    ),
                )
            })?;
            let text = text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text);
            if text.is_empty() {
                return Err(FieldViolation::new(
                    file_field,
                    format!("{} is empty; write the credential in it", path.display()),
                ));
            }
            Ok(Some(Secret::new(text)))
        }
        (None, Some(name)) => match lookup(name) {
            Some(text) if !text.is_empty() => Ok(Some(Secret::new(text))),
            Some(_) => Err(FieldViolation::new(
                env_field,
                format!("the environment variable {name} is empty"),
            )),
            None => Err(FieldViolation::new(
                env_field,
                format!(
                    "the environment variable {name} is not set; set it in the proxy's \
                     environment (patterns inherit it) or in this pattern entry's env:"
                ),
            )),
        },
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("from-env".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn read(file: Option<&Path>, var: Option<&str>) -> Result<Option<Secret>, FieldViolation> {
        read_secret(
            ("config.password_file", file),
            ("config.password_env", var),
            &env,
        )
    }

    #[test]
    fn from_a_file_without_its_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\r\n").unwrap();
        assert_eq!(
            read(Some(&path), None).unwrap(),
            Some(Secret::new("s3cret"))
        );
        std::fs::write(&path, "a b\n\n").unwrap();
        assert_eq!(read(Some(&path), None).unwrap(), Some(Secret::new("a b\n")));
        std::fs::write(&path, "\n").unwrap();
        let e = read(Some(&path), None).unwrap_err();
        assert!(e.message.contains("is empty"), "{}", e.message);
    }

    #[test]
    fn a_missing_file_names_the_setting_and_the_path() {
        let e = read(Some(Path::new("/nonexistent/pw")), None).unwrap_err();
        assert_eq!(e.field, "config.password_file");
        assert!(
            e.message
                .starts_with("cannot read /nonexistent/pw: No such file"),
            "{}",
            e.message
        );
    }

    #[test]
    fn from_the_environment() {
        assert_eq!(
            read(None, Some("SET")).unwrap(),
            Some(Secret::new("from-env"))
        );
        let e = read(None, Some("UNSET")).unwrap_err();
        assert_eq!(e.field, "config.password_env");
        assert!(e.message.contains("UNSET is not set"), "{}", e.message);
        assert!(read(None, Some("EMPTY")).is_err());
        assert_eq!(read(None, None).unwrap(), None);
        let e = read(Some(Path::new("/x")), Some("SET")).unwrap_err();
        assert!(e.message.contains("not both"), "{}", e.message);
    }

    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** Secret(***)");
    }
}
