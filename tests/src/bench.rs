//! Helpers the benchmarks share: process CPU time, medians, and `--name N` / `--name TEXT`
//! flags.

use anyhow::{Context, Result};

/// CPU seconds (user + system) this process has used.
pub fn own_cpu_s() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // the fields after the parenthesised command name; utime and stime are the 12th and 13th
    let rest = stat.rsplit_once(')').context("/proc/self/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11).zip(f.get(12)).context("/proc/self/stat is short")?;
    Ok((ticks.0.parse::<f64>()? + ticks.1.parse::<f64>()?) / 100.0)
}

/// The median (the upper one of an even count); NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The number after flag `name` on the command line, or `default`.
pub fn arg(name: &str, default: usize) -> Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a number"))?
            .parse()
            .with_context(|| format!("{name} needs a number")),
        None => Ok(default),
    }
}

/// The text after flag `name` on the command line, if given.
pub fn text_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}
