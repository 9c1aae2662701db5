//! The walship binary: everything lives in the library; see `walship::cli`.

fn main() -> std::process::ExitCode {
    walship::cli::main()
}
