//! Every signed checkpoint leaves the database when it is made: a LOG line carrying its
//! digest, and `custody.checkpoint_command`, run the way archive_command is (`%p`: a file
//! holding the digest JSON, `%s`: the checkpoint's seq, `%%`: a percent sign), so that a copy
//! the database's superuser cannot reach exists of every head the chain had.
//!
//! The command runs in the background, one at a time: a slow or hanging command never holds
//! up the writer. A checkpoint made while the previous command still runs is not handed to
//! it; the next one is (a later digest covers every record an earlier one did).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::queue::{Consumer, Text};
use crate::settings;

/// The file `%p` names (in the data directory, the writer's working directory).
const DIGEST_FILE: &str = "pg_custody.checkpoint.json";

pub struct Archiver {
    running: Option<(Child, i64)>,
}

/// The command line for a checkpoint: `%p`, `%s` and `%%` replaced.
pub fn expand(template: &str, path: &str, seq: i64) -> String {
    let mut out = String::with_capacity(template.len() + path.len());
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('p') => out.push_str(path),
            Some('s') => out.push_str(&seq.to_string()),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

impl Archiver {
    pub fn new() -> Archiver {
        Archiver { running: None }
    }

    /// A checkpoint was made: log it and hand it to the command.
    pub fn checkpoint(&mut self, seq: i64, digest_json: &str, queue: &Consumer) {
        pgrx::log!("pg_custody writer: checkpoint {seq} signed; digest: {digest_json}");
        self.poll(queue);
        let Some(template) = settings::checkpoint_command() else { return };
        if self.running.is_some() {
            return; // the next checkpoint goes to the command instead
        }
        let path = std::env::current_dir().map(|d| d.join(DIGEST_FILE)).unwrap_or_else(|_| DIGEST_FILE.into());
        let path = path.to_string_lossy().into_owned();
        if let Err(e) = std::fs::write(&path, format!("{digest_json}\n")) {
            self.failed(queue, seq, &format!("could not write {path}: {e}"));
            return;
        }
        let line = expand(&template, &path, seq);
        match Command::new("/bin/sh").arg("-c").arg(&line).stdin(Stdio::null()).spawn() {
            Ok(child) => self.running = Some((child, seq)),
            Err(e) => self.failed(queue, seq, &format!("could not run custody.checkpoint_command: {e}")),
        }
    }

    /// Collects a finished command.
    pub fn poll(&mut self, queue: &Consumer) {
        let Some((child, seq)) = self.running.as_mut() else { return };
        let seq = *seq;
        match child.try_wait() {
            Ok(None) => {}
            Ok(Some(status)) => {
                self.running = None;
                if status.success() {
                    queue.set_archived_seq(seq);
                    queue.set_text(Text::Archive, "");
                } else {
                    self.failed(queue, seq, &format!("custody.checkpoint_command exited with {status}"));
                }
            }
            Err(e) => {
                self.running = None;
                self.failed(queue, seq, &format!("custody.checkpoint_command: {e}"));
            }
        }
    }

    /// At stop: gives a running command up to `timeout` to finish.
    pub fn finish(&mut self, queue: &Consumer, timeout: Duration) {
        let start = Instant::now();
        while self.running.is_some() && start.elapsed() < timeout {
            self.poll(queue);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn failed(&self, queue: &Consumer, seq: i64, why: &str) {
        pgrx::warning!("pg_custody writer: checkpoint {seq} did not leave the database: {why}");
        queue.set_text(Text::Archive, &format!("checkpoint {seq}: {why}"));
    }
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn placeholders() {
        assert_eq!(expand("cp %p /archive/%s.json", "/data/f.json", 42), "cp /data/f.json /archive/42.json");
        assert_eq!(expand("echo 100%% %x %", "p", 1), "echo 100% %x %");
        assert_eq!(expand("", "p", 1), "");
    }
}
