//! A pattern's stdout and stderr: read line by line (bounded), re-emitted as
//! log events in the pattern's span, and the last lines of stderr kept for
//! the admin API. JSON lines from the SDK's logger are re-emitted at their
//! own level with their own message.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Longest line kept; the rest of a longer line is cut off and dropped.
pub const MAX_LINE: usize = 8 * 1024;
/// How many stderr lines [`Tail`] keeps.
pub const TAIL_LINES: usize = 20;

/// The last [`TAIL_LINES`] lines a pattern wrote to stderr. The lock is a
/// plain mutex held only to push or copy, never across an await.
#[derive(Debug, Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    pub fn push(&self, line: String) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    pub fn lines(&self) -> Vec<String> {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().cloned().collect()
    }

    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The last `n` lines joined, for error messages.
    pub fn last(&self, n: usize) -> String {
        let lines = self.lines();
        let start = lines.len().saturating_sub(n);
        lines[start..].join(" | ")
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes (a longer line is truncated
/// and its remainder skipped). `None` at end of stream.
pub async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') && n == MAX_LINE {
        // Skip the rest of an over-long line.
        let mut sink = Vec::new();
        loop {
            sink.clear();
            let m = (&mut *r)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut sink)
                .await?;
            if m == 0 || sink.last() == Some(&b'\n') {
                break;
            }
        }
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Forwards every stderr line to the log and the tail until end of stream.
pub async fn forward_stderr<R: AsyncBufRead + Unpin>(mut r: R, tail: Tail) {
    while let Ok(Some(line)) = read_line(&mut r).await {
        let message = reemit(&line);
        tail.push(message);
    }
}

/// Drains stdout after the handshake so the child never blocks on a full
/// pipe; lines are logged at debug level.
pub async fn drain_stdout<R: AsyncBufRead + Unpin>(mut r: R) {
    while let Ok(Some(line)) = read_line(&mut r).await {
        tracing::debug!(stream = "stdout", "{line}");
    }
}

/// Logs one stderr line and returns the text kept in the tail.
fn reemit(line: &str) -> String {
    let parsed = serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| {
            let level = v.get("level")?.as_str()?.to_ascii_uppercase();
            let message = v
                .get("fields")
                .and_then(|f| f.get("message"))
                .and_then(|m| m.as_str())
                .unwrap_or("")
                .to_string();
            // Keep the pattern's other fields visible, compactly.
            let extra = v
                .get("fields")
                .and_then(|f| f.as_object())
                .map(|f| {
                    f.iter()
                        .filter(|(k, _)| k.as_str() != "message")
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            // The span the pattern logged in (the SDK puts the caller's
            // request_id there) rides along too.
            let span = v
                .get("span")
                .and_then(|f| f.as_object())
                .map(|f| {
                    f.iter()
                        .filter(|(k, _)| k.as_str() != "name")
                        .map(|(k, v)| match v.as_str() {
                            Some(s) => format!("{k}={s}"),
                            None => format!("{k}={v}"),
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            let extra = [extra, span]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            let text = if extra.is_empty() {
                message
            } else {
                format!("{message} {extra}")
            };
            Some((level, text))
        });
    match parsed {
        Some((level, text)) => {
            match level.as_str() {
                "ERROR" => tracing::error!(stream = "stderr", "{text}"),
                "WARN" => tracing::warn!(stream = "stderr", "{text}"),
                "DEBUG" => tracing::debug!(stream = "stderr", "{text}"),
                "TRACE" => tracing::trace!(stream = "stderr", "{text}"),
                _ => tracing::info!(stream = "stderr", "{text}"),
            }
            text
        }
        None => {
            tracing::info!(stream = "stderr", "{line}");
            line.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        let t = Tail::default();
        for i in 0..(TAIL_LINES + 5) {
            t.push(i.to_string());
        }
        let lines = t.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "5");
        assert_eq!(
            t.last(2),
            format!("{} | {}", TAIL_LINES + 3, TAIL_LINES + 4)
        );
    }

    #[tokio::test]
    async fn long_lines_are_truncated_and_the_next_line_survives() {
        let mut input = vec![b'a'; MAX_LINE * 3];
        input.extend_from_slice(b"\nnext\n");
        let mut r: &[u8] = &input;
        assert_eq!(read_line(&mut r).await.unwrap().unwrap().len(), MAX_LINE);
        assert_eq!(read_line(&mut r).await.unwrap().as_deref(), Some("next"));
        assert_eq!(read_line(&mut r).await.unwrap(), None);
    }

    #[tokio::test]
    async fn json_lines_keep_their_message_in_the_tail() {
        let input =
            b"{\"level\":\"WARN\",\"fields\":{\"message\":\"disk low\",\"free\":3}}\nplain text\n";
        let tail = Tail::default();
        forward_stderr(&input[..], tail.clone()).await;
        assert_eq!(
            tail.lines(),
            vec!["disk low free=3".to_string(), "plain text".to_string()]
        );
    }
}
