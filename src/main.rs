//! The `loft` binary: parse the command line, run it, and turn any error into one line.

use clap::{CommandFactory, FromArgMatches};

fn main() {
    let matches = match loft::cli::Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => match loft::cli::one_line_value_error(&e) {
            Some(line) => {
                eprintln!("loft: error: {line}");
                std::process::exit(1);
            }
            None => e.exit(),
        },
    };
    let cli = match loft::cli::Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match loft::cli::run(cli, Some(&matches)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("loft: error: {e}");
            std::process::exit(1);
        }
    }
}
