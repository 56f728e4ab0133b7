//! CNI errors: a code from the spec, a message, and details, printed as JSON.

use serde::Serialize;

/// Well-known CNI error codes (CNI spec, "Error").
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unknown container or container does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN: u32 = 11;
    /// The plugin is not available (STATUS).
    pub const NOT_AVAILABLE: u32 = 50;
}

/// An error the runtime sees.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CniError {
    /// The CNI error code.
    pub code: u32,
    /// One line for humans.
    pub msg: String,
    /// More context.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    /// An error with a code and message.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    /// Adds details.
    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// An I/O failure with what was being done.
    pub fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        CniError::new(code::IO, what.to_string()).details(e.to_string())
    }

    /// The JSON the runtime reads on stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["cniVersion"] = serde_json::Value::String(cni_version.to_string());
        v.to_string()
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}
