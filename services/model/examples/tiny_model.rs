//! Writes the tiny random-weight test model: `tiny_model DIR [SEED]`.
//! Benchmarks of data paths use it so generation costs next to nothing.
fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: tiny_model DIR [SEED]"));
    let seed = args.next().map_or(1, |s| s.parse().expect("seed"));
    std::fs::create_dir_all(&dir).expect("create dir");
    let path = flywheel_model::testing::write_tiny_model(&dir, seed).expect("write model");
    println!("{}", path.display());
}
