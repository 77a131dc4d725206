//! The control socket protocol between the CLI and a running node: one JSON object per line.
//!
//! Request: `{"cmd":"status"}`, `{"cmd":"promote","force":true}`, `{"cmd":"demote","force":false}`,
//! `{"cmd":"events"}` (the connection then carries one event per line until closed).
//! Reply: `{"ok":true,"status":{..}}`, `{"ok":true,"message":".."}` or `{"ok":false,"error":".."}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::status::Status;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Promote {
        #[serde(default)]
        force: bool,
    },
    Demote {
        #[serde(default)]
        force: bool,
    },
    Connect {
        #[serde(default)]
        discard_my_data: bool,
    },
    Disconnect,
    Verify,
    Events,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn status(s: Status) -> Reply {
        Reply {
            ok: true,
            status: Some(s),
            message: None,
            error: None,
        }
    }
    pub fn message(m: impl Into<String>) -> Reply {
        Reply {
            ok: true,
            status: None,
            message: Some(m.into()),
            error: None,
        }
    }
    pub fn error(e: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            status: None,
            message: None,
            error: Some(e.into()),
        }
    }
}

/// One line of `events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// What changed: "start" (the first line), "role", "disk", "connection" (also the peer's
    /// role and disk), "resync", "nbd_clients", "out_of_sync", "current" (a line sent to a
    /// reader that attaches), "lagged" (a reader fell behind; no status).
    pub kind: String,
    /// Free text for operators.
    pub detail: String,
    pub status: Status,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the twinbd daemon at {path}: {source} (is `twinbd run` running for this node?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: bad reply: {detail}")]
    BadReply { path: PathBuf, detail: String },
    #[error("{0}")]
    Refused(String),
}

/// A blocking client for the CLI.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ControlError> {
        let s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let io = |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        };
        let writer = s.try_clone().map_err(io)?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(s),
            writer,
        })
    }

    /// Sends a request and waits (up to `timeout`) for its reply; a refusal becomes an error.
    pub fn call(&mut self, req: &Request, timeout: Duration) -> Result<Reply, ControlError> {
        self.send(req)?;
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(|source| self.io(source))?;
        let reply: Reply = self.next_line()?;
        if !reply.ok {
            return Err(ControlError::Refused(
                reply.error.unwrap_or_else(|| "refused".into()),
            ));
        }
        Ok(reply)
    }

    pub fn send(&mut self, req: &Request) -> Result<(), ControlError> {
        let mut line = serde_json::to_string(req).map_err(|e| ControlError::BadReply {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| self.io(source))
    }

    /// Reads the next JSON line (an event after `events`).
    pub fn next_line<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T, ControlError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| self.io(source))?;
        if n == 0 {
            return Err(ControlError::BadReply {
                path: self.path.clone(),
                detail: "daemon closed the connection".into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| ControlError::BadReply {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }

    /// Reads the next raw line (for passing events through unchanged).
    pub fn next_raw_line(&mut self) -> Result<Option<String>, ControlError> {
        self.reader
            .get_ref()
            .set_read_timeout(None)
            .map_err(|source| self.io(source))?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| self.io(source))?;
        Ok((n > 0).then_some(line))
    }

    fn io(&self, source: std::io::Error) -> ControlError {
        ControlError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r: Request = serde_json::from_str(r#"{"cmd":"promote","force":true}"#).expect("parse");
        assert_eq!(r, Request::Promote { force: true });
        let r: Request = serde_json::from_str(r#"{"cmd":"demote"}"#).expect("parse");
        assert_eq!(r, Request::Demote { force: false });
        assert_eq!(
            serde_json::to_string(&Request::Status).expect("json"),
            r#"{"cmd":"status"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format_disk"}"#).is_err());
    }
}
