//! Progress bars (indicatif, on stderr when it is a terminal) for the trainer's progress reports.

use indicatif::{ProgressBar, ProgressStyle};
use normvision::train::Progress;

/// One bar per epoch, labelled `label eN`.
pub struct Bars {
    label: String,
    bar: ProgressBar,
    style: ProgressStyle,
}

impl Bars {
    pub fn new(label: &str) -> Bars {
        Bars {
            label: label.to_string(),
            bar: ProgressBar::hidden(),
            style: ProgressStyle::with_template("{prefix:>12} [{bar:28}] {pos}/{len} {msg}")
                .expect("template")
                .progress_chars("=> "),
        }
    }

    /// Bars when stderr is a terminal and not `quiet`.
    pub fn boxed(label: &str, quiet: bool) -> Option<Box<dyn Progress>> {
        use std::io::IsTerminal;
        (!quiet && std::io::stderr().is_terminal())
            .then(|| Box::new(Bars::new(label)) as Box<dyn Progress>)
    }
}

impl Progress for Bars {
    fn epoch_start(&mut self, epoch: usize, batches: usize, done: usize) {
        self.bar = ProgressBar::new(batches as u64);
        self.bar.set_style(self.style.clone());
        self.bar.set_prefix(format!("{} e{epoch}", self.label));
        self.bar.set_position(done as u64);
    }
    fn step(&mut self, status: &str) {
        self.bar.inc(1);
        self.bar.set_message(status.to_string());
    }
    fn epoch_end(&mut self) {
        self.bar.finish_and_clear();
    }
}
