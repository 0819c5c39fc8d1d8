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

/// One bar over an experiment's runs (on a terminal, unless quiet), fed by [`RunBar::callback`].
pub struct RunBar {
    bar: Option<std::sync::Arc<ProgressBar>>,
}

impl RunBar {
    pub fn new(quiet: bool) -> RunBar {
        use std::io::IsTerminal;
        RunBar {
            bar: (!quiet && std::io::stderr().is_terminal())
                .then(|| std::sync::Arc::new(ProgressBar::hidden())),
        }
    }
    /// The experiment's progress callback, labelled `label`.
    pub fn callback(&self, label: &str) -> Option<normvision::experiment::runs::RunProgress> {
        let bar = self.bar.clone()?;
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>24} [{bar:28}] {pos}/{len} runs {elapsed} {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        bar.set_position(0);
        Some(normvision::experiment::runs::RunProgress(
            std::sync::Arc::new(move |done, total, what| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                let mut w = what.to_string();
                if w.len() > 60 {
                    w.truncate(60);
                }
                bar.set_message(w);
            }),
        ))
    }
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
