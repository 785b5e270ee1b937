//! The `loft` command line.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r = if args.len() > 3 && args[2] == "--step-only" {
        loft::bench::step_row(args[3].parse().unwrap(), 128)
    } else {
        loft::bench::run(&loft::bench::BenchOptions { batch: 128, quick: false })
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
