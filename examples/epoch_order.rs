//! Prints the order in which `normvision train --seed S` visits the training samples in epoch E (0-based), as
//! comma-separated indices: the input of `tools/torch_one_epoch.py --order`, which trains PyTorch on exactly
//! normvision's batches.
//!
//! `cargo run --release --example epoch_order -- SEED EPOCH [N]` (N: the number of training samples, 60000 for
//! Fashion-MNIST).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parse = |i: usize, default: Option<u64>| -> u64 {
        match args.get(i) {
            Some(v) => v.parse().unwrap_or_else(|_| {
                eprintln!(
                    "error: argument {} ({v:?}) is not a non-negative integer",
                    i + 1
                );
                std::process::exit(2)
            }),
            None => default.unwrap_or_else(|| {
                eprintln!("usage: epoch_order SEED EPOCH [N]");
                std::process::exit(2)
            }),
        }
    };
    let (seed, epoch, n) = (parse(0, None), parse(1, None), parse(2, Some(60000)));
    let order = normvision::data::loader::epoch_order(n as usize, true, seed, epoch as usize);
    let text: Vec<String> = order.iter().map(|v| v.to_string()).collect();
    println!("{}", text.join(","));
}
