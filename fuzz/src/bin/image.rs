//! AFL++ target: normvision's image parser (see `normvision::internals::fuzz::image`).
fn main() {
    // Any panic is a crash for AFL++ (abort), except the image decoders' panics, which the library turns into
    // errors (normvision::data::decode::decode_bytes) and which are therefore not crashes of normvision.
    std::panic::set_hook(Box::new(|info| {
        if !normvision::data::decode::is_decoder_panic(info) {
            std::process::abort();
        }
    }));
    afl::fuzz_nohook!(|data: &[u8]| normvision::internals::fuzz::image(data));
}
