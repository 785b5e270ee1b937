//! The `loft` binary: parse the command line, run it, and turn any error into one line.

use clap::Parser;

fn main() {
    let cli = loft::cli::Cli::parse();
    if let Err(e) = loft::cli::run(cli) {
        eprintln!("loft: error: {e}");
        std::process::exit(1);
    }
}
