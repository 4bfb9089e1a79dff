//! The layered lookup: each option's value from the flag, its environment variable, the
//! `--config` file or clap's default, with the origin an error message names.
//!
//! One rule for every option: a value the user set as a flag or environment variable
//! wins over the file, and the file wins over the default. The origin is the flag
//! (`--connect-timeout`, also for a default), the variable (`AMBASSADORD_CONNECT_TIMEOUT`)
//! or `FILE: key` (`/etc/ambassadord.toml: connect_timeout`); file keys are named as the
//! clap ids are.

use std::fmt::Display;

use clap::ArgMatches;
use clap::parser::ValueSource;

/// One option's value and where it came from.
#[derive(Debug, Clone)]
pub(super) struct Layered<T> {
    pub value: T,
    /// The flag, environment variable or `FILE: key`, as error messages name it.
    pub origin: String,
    /// Set by the user (flag, environment or file) rather than defaulted.
    pub explicit: bool,
}

impl<T> Layered<Option<T>> {
    /// `None` when no layer had a value.
    pub fn transpose(self) -> Option<Layered<T>> {
        let Layered {
            value,
            origin,
            explicit,
        } = self;
        value.map(|value| Layered {
            value,
            origin,
            explicit,
        })
    }
}

impl Layered<String> {
    /// The value without surrounding whitespace (which errors then do not show either).
    pub fn trimmed(self) -> Self {
        Layered {
            value: self.value.trim().to_string(),
            ..self
        }
    }

    /// Turns the text into a typed value; the error names the origin and the value.
    pub fn parse<U>(&self, parse: impl FnOnce(&str) -> Result<U, String>) -> Result<U, String> {
        parse(&self.value).map_err(|why| at(&self.origin, &self.value, &why))
    }
}

/// The one shape of a config error: `ORIGIN 'VALUE': WHY`.
pub(super) fn at(origin: &str, value: &str, why: &str) -> String {
    format!("{origin} '{value}': {why}")
}

/// The layers of one parse: what clap found (and where) and the `--config` file's name.
pub(super) struct Layers<'a> {
    matches: &'a ArgMatches,
    command: clap::Command,
    /// The file's path as written, for `FILE: key` origins (empty without `--config`).
    file_name: String,
}

impl<'a> Layers<'a> {
    pub fn new(matches: &'a ArgMatches, command: clap::Command, file_name: String) -> Self {
        Layers {
            matches,
            command,
            file_name,
        }
    }

    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    /// Where clap found `id`'s value, if anywhere.
    pub fn source(&self, id: &str) -> Option<ValueSource> {
        self.matches.value_source(id)
    }

    /// Whether the user set `id` as a flag or environment variable.
    pub fn given(&self, id: &str) -> bool {
        matches!(
            self.matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    }

    /// Names where `id`'s command-line value came from: its environment variable, or
    /// its flag (also for a default), or `BACKEND` for the positional argument.
    pub fn origin(&self, id: &str) -> String {
        let arg = self.command.get_arguments().find(|a| a.get_id() == id);
        match (self.matches.value_source(id), arg) {
            (Some(ValueSource::EnvVariable), Some(arg)) => match arg.get_env() {
                Some(env) => env.to_string_lossy().into_owned(),
                None => id.to_string(),
            },
            (_, Some(arg)) if arg.is_positional() => "BACKEND".to_string(),
            (_, Some(arg)) => format!("--{}", arg.get_long().unwrap_or(id)),
            (_, None) => id.to_string(),
        }
    }

    /// `cli`, the command line's value of `id`, with its origin.
    pub fn cli<T>(&self, id: &str, cli: T) -> Layered<T> {
        Layered {
            value: cli,
            origin: self.origin(id),
            explicit: self.given(id),
        }
    }

    /// The value of option `id`: `cli` (clap's value: the flag, the environment
    /// variable or the default) if the user set it, else the file's `file` made typed by
    /// `from_file` (whose error is the reason in a message naming `FILE: id`), else `cli`.
    /// The file's value is converted only when it is the one used, so a bad value the
    /// flag overrides is no error.
    pub fn pick<T, F: Display + ?Sized>(
        &self,
        id: &str,
        cli: T,
        file: Option<&F>,
        from_file: impl FnOnce(&F) -> Result<T, String>,
    ) -> Result<Layered<T>, String> {
        let Some(raw) = file.filter(|_| !self.given(id)) else {
            return Ok(self.cli(id, cli));
        };
        let origin = format!("{}: {id}", self.file_name);
        let value = from_file(raw).map_err(|why| at(&origin, &raw.to_string(), &why))?;
        Ok(Layered {
            value,
            origin,
            explicit: true,
        })
    }
}

/// `from_file` for [`Layers::pick`] when the option is text in every layer.
pub(super) fn text(raw: &str) -> Result<String, String> {
    Ok(raw.to_string())
}

/// [`text`] for an option without a default (`cli` is an `Option`).
pub(super) fn some_text(raw: &str) -> Result<Option<String>, String> {
    Ok(Some(raw.to_string()))
}
