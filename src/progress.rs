//! Progress for long work: an indicatif bar on a terminal, a plain line every few seconds
//! otherwise (CI logs, `nohup`), both with counts, rate and ETA.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
    what: String,
    /// Plain-line mode: when the last line was printed and at which position.
    plain: Option<Mutex<(Instant, u64)>>,
}

const PLAIN_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    pub fn new(len: u64, what: &str) -> Self {
        Self::build(len, what, None)
    }

    /// A bar drawn as one line of `multi` (on a terminal; plain lines otherwise).
    pub fn in_multi(multi: &MultiProgress, len: u64, what: &str) -> Self {
        Self::build(len, what, Some(multi))
    }

    /// A `MultiProgress` that draws on stderr when it is a terminal and nowhere otherwise.
    pub fn multi() -> MultiProgress {
        if std::io::stderr().is_terminal() {
            MultiProgress::new()
        } else {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        }
    }

    fn build(len: u64, what: &str, multi: Option<&MultiProgress>) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let mut bar = ProgressBar::new(len);
        if let Some(m) = multi {
            bar = m.add(bar);
        } else {
            bar.set_draw_target(if terminal {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            });
        }
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{what} [{{elapsed_precise}}] {{bar:30.cyan/blue}} {{pos}}/{{len}} ({{per_sec}}, ETA {{eta}}) {{msg}}"
            ))
            .expect("valid template")
            .progress_chars("=> "),
        );
        Self {
            bar,
            what: what.to_string(),
            plain: (!terminal).then(|| Mutex::new((Instant::now(), u64::MAX))),
        }
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        self.maybe_line(false);
    }

    /// Starts the bar over with a new length (a new step's phase).
    pub fn restart(&self, len: u64) {
        self.bar.reset();
        self.bar.set_length(len);
        if let Some(last) = &self.plain {
            *last.lock().unwrap() = (Instant::now(), u64::MAX);
        }
    }

    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    /// Prints a line above the bars (or plainly when there are none).
    pub fn println(&self, line: impl AsRef<str>) {
        if self.plain.is_some() {
            eprintln!("{}", line.as_ref());
        } else {
            self.bar.suspend(|| eprintln!("{}", line.as_ref()));
        }
    }

    pub fn set_message(&self, msg: impl Into<String>) {
        self.bar.set_message(msg.into());
    }

    pub fn finish(&self) {
        self.bar.finish();
        self.maybe_line(true);
    }

    fn maybe_line(&self, force: bool) {
        let Some(last) = &self.plain else { return };
        let mut last = last.lock().unwrap();
        let b = &self.bar;
        let due = last.0.elapsed() >= PLAIN_EVERY;
        if (force || due) && last.1 != b.position() {
            *last = (Instant::now(), b.position());
            eprintln!(
                "{}: {}/{} ({:.1}/s, elapsed {:.0}s, ETA {:.0}s) {}",
                self.what,
                b.position(),
                b.length().unwrap_or(0),
                b.per_sec(),
                b.elapsed().as_secs_f64(),
                b.eta().as_secs_f64(),
                b.message()
            );
        }
    }
}
