//! Train/eval mode, passed explicitly to every forward and backward (no hidden global state).

/// Whether a layer runs with batch statistics (and updates running statistics) or with frozen ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Mode {
    /// Batch statistics; running statistics are updated; dropout active.
    Train,
    /// Running statistics (where tracked); nothing is updated.
    Eval,
}

impl Mode {
    pub fn is_train(self) -> bool {
        self == Mode::Train
    }
}
