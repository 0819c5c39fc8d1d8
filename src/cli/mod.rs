//! The `normvision` command line: argument definitions and one module per group of subcommands.

pub mod args;
pub mod bench_kernels;
pub mod commands;
