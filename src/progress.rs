//! Progress output: a live bar on a terminal, plain periodic lines otherwise, or nothing.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A bar redrawn in place (stderr is a terminal).
    Bar,
    /// A line every few seconds or every tenth of the work.
    Lines,
    /// Nothing.
    Quiet,
}

/// The `--progress` choice, as configured (and recorded in configurations).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    /// A bar on a terminal, lines otherwise.
    #[default]
    Auto,
    /// A bar redrawn in place.
    Bar,
    /// A line every few seconds or every tenth of the work.
    Lines,
    /// Nothing.
    None,
}

impl Style {
    /// How progress is shown on this rank (only rank 0 shows any).
    pub fn mode(self, lead: bool) -> Mode {
        match self {
            _ if !lead => Mode::Quiet,
            Style::Auto if std::io::stderr().is_terminal() => Mode::Bar,
            Style::Auto | Style::Lines => Mode::Lines,
            Style::Bar => Mode::Bar,
            Style::None => Mode::Quiet,
        }
    }
}

/// Progress of one phase of `total` units (e.g. the batches of an epoch).
pub struct Progress {
    mode: Mode,
    label: String,
    total: usize,
    start: Instant,
    last_draw: Instant,
    last_line_tenth: usize,
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}s", s)
    }
}

impl Progress {
    /// Start a phase.
    pub fn new(mode: Mode, label: impl Into<String>, total: usize) -> Self {
        let now = Instant::now();
        Progress {
            mode,
            label: label.into(),
            total: total.max(1),
            start: now,
            last_draw: now,
            last_line_tenth: 0,
        }
    }

    /// Report that `done` units are finished; `status` (e.g. loss and accuracy) is only
    /// called when a line is drawn, so updates cost nothing in between.
    pub fn update(&mut self, done: usize, status: impl FnOnce() -> String) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.start);
        let eta = if done > 0 {
            elapsed.mul_f64((self.total.saturating_sub(done)) as f64 / done as f64)
        } else {
            Duration::ZERO
        };
        match self.mode {
            Mode::Quiet => {}
            Mode::Bar => {
                if now.duration_since(self.last_draw) < Duration::from_millis(200) && done < self.total {
                    return;
                }
                self.last_draw = now;
                let status = status();
                let width = 24;
                let filled = width * done / self.total;
                let bar: String = (0..width)
                    .map(|i| {
                        if i < filled {
                            '='
                        } else if i == filled {
                            '>'
                        } else {
                            ' '
                        }
                    })
                    .collect();
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r\x1b[2K{} [{bar}] {done}/{} {status} | {} elapsed, ETA {}",
                    self.label,
                    self.total,
                    fmt_duration(elapsed),
                    fmt_duration(eta)
                );
                let _ = err.flush();
            }
            Mode::Lines => {
                let tenth = 10 * done / self.total;
                let due = now.duration_since(self.last_draw) >= Duration::from_secs(30);
                if tenth > self.last_line_tenth || due {
                    self.last_line_tenth = tenth;
                    self.last_draw = now;
                    let status = status();
                    eprintln!(
                        "{} {done}/{} {status} | {} elapsed, ETA {}",
                        self.label,
                        self.total,
                        fmt_duration(elapsed),
                        fmt_duration(eta)
                    );
                }
            }
        }
    }

    /// End the phase (clears the bar's line).
    pub fn finish(&mut self) {
        if self.mode == Mode::Bar {
            eprint!("\r\x1b[2K");
        }
    }
}
