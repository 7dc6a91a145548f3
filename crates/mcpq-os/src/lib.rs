//! What mcpq asks of the operating system beyond the standard library: a thread's scheduling
//! policy, and the per-thread figures of `/proc`. The one `unsafe` block (a system call with no
//! safe binding in the crates mcpq uses) has the reason it is sound beside it; every other mcpq
//! crate forbids unsafe code.

use std::io;
use std::path::Path;

/// Linux's number for the batch scheduling policy (`SCHED_BATCH`).
pub const SCHED_BATCH: u32 = 3;

/// Runs the calling thread under Linux's batch policy (`SCHED_BATCH`), keeping its nice value:
/// the scheduler treats it as CPU-bound, so when it wakes it does not preempt the thread running
/// on a busy CPU; it runs at once on an idle CPU, and otherwise when the running thread's slice
/// ends. Its share of the CPUs stays the same. For a thread that works in batches, such as a
/// group-commit writer, this means fewer preemptions of the threads that feed it and larger
/// batches while the CPUs are busy, at no cost while they are idle. Unprivileged threads may
/// take this policy. Elsewhere than Linux there is nothing to do.
pub fn batch_current_thread() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // The system call itself rather than libc's wrapper, which musl leaves unimplemented.
        #[allow(unsafe_code)]
        // SAFETY: pid 0 names the calling thread; `param` is a valid `sched_param` that lives
        // on this stack for the whole call, which only reads it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_sched_setscheduler,
                0 as libc::pid_t,
                libc::SCHED_BATCH,
                &param as *const libc::sched_param,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The fields mcpq reads from a `stat` file of `/proc` (proc(5)), a process's or a thread's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    /// The command or thread name, field 2 (Linux keeps its first 15 bytes).
    pub name: String,
    /// User plus system CPU time, fields 14 and 15, in clock ticks.
    pub cpu_ticks: u64,
    /// The scheduling policy, field 41, in Linux's numbering; absent from a shorter line.
    pub policy: Option<u32>,
}

impl Stat {
    /// Parses a `stat` line. The name is in brackets and may hold spaces and brackets itself,
    /// so fields are counted after the last `)`, which field 3 follows.
    pub fn parse(line: &str) -> Option<Self> {
        let open = line.find('(')?;
        let close = line.rfind(')')?;
        let name = line.get(open + 1..close)?.to_owned();
        let fields: Vec<&str> = line.get(close + 1..)?.split_ascii_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let cpu_ticks = field(14)? + field(15)?;
        let policy = field(41).and_then(|p| u32::try_from(p).ok());
        Some(Self { name, cpu_ticks, policy })
    }

    /// Reads and parses the `stat` file at `path`.
    pub fn read(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        Self::parse_from(&std::fs::read_to_string(path)?, path)
    }

    /// Parses `line`, read from `path`: an error names the file.
    fn parse_from(line: &str, path: &Path) -> io::Result<Self> {
        Self::parse(line).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("cannot parse {}", path.display()))
        })
    }
}

/// The `stat` of each of this process's threads named `name`, compared as Linux keeps a
/// thread's name: its first 15 bytes. A thread that ends while they are read is left out.
pub fn threads_named(name: &str) -> io::Result<Vec<Stat>> {
    let cut = name.get(..15).unwrap_or(name);
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task")? {
        let path = task?.path().join("stat");
        // a thread that ended since the listing has no file left to read (or one that fails)
        let Ok(line) = std::fs::read_to_string(&path) else { continue };
        let s = Stat::parse_from(&line, &path)?;
        if s.name == cut {
            found.push(s);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_name_cpu_and_policy_even_with_brackets_in_the_name() {
        // fields 3..=52 numbered by their position, but for CPU (14, 15) and policy (41)
        let mut fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        fields[14 - 3] = "250".into();
        fields[15 - 3] = "50".into();
        fields[41 - 3] = "3".into();
        let line = format!("4242 (a (b) c) {}\n", fields.join(" "));
        let s = Stat::parse(&line).expect("a full line parses");
        assert_eq!(s, Stat { name: "a (b) c".into(), cpu_ticks: 300, policy: Some(3) });
        // an older kernel's shorter line has no policy
        let short = "123 (x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(Stat::parse(short).and_then(|s| s.policy), None);
        assert_eq!(Stat::parse(short).map(|s| s.cpu_ticks), Some(300));
        assert!(Stat::parse("garbage").is_none());
        assert!(Stat::parse("1 (cut short) R 1 2").is_none());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_marks_itself_batch_and_only_itself() {
        let name = "mcpq-os-batch-test";
        let policy_of = |name: &str| {
            let found = threads_named(name).expect("list threads");
            assert_eq!(found.len(), 1, "one thread named {name}: {found:?}");
            found[0].policy.expect("this kernel reports policies")
        };
        let main = || Stat::read("/proc/self/stat").expect("own stat").policy;
        let main_before = main();
        let (before, after) = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let before = policy_of(name);
                batch_current_thread().expect("an unprivileged thread may take SCHED_BATCH");
                (before, policy_of(name))
            })
            .expect("spawn")
            .join()
            .expect("the test thread ran");
        // a new thread starts with its creator's policy, and marking it changes only its own
        assert_eq!(Some(before), main_before);
        assert_eq!(after, SCHED_BATCH);
        assert_eq!(main(), main_before);
        assert!(threads_named("no-such-thread").expect("list threads").is_empty());
    }
}
