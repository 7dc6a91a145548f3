//! The `mcpq` binary.

// every dispatched call allocates (JSON, HTTP): glibc's malloc took a fifth of the dispatch
// path's CPU in profiles; mimalloc takes a fraction of that
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mcpq::cli::main()
}
