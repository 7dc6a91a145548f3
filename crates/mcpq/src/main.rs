//! The `mcpq` binary.

fn main() -> std::process::ExitCode {
    mcpq::cli::main()
}
