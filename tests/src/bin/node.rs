//! The `mcpq` command, built inside the test package so end-to-end tests can start replicas
//! as processes (`CARGO_BIN_EXE_mcpq-e2e-node`) and kill, stop and continue them.

fn main() -> std::process::ExitCode {
    mcpq::cli::main()
}
