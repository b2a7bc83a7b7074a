//! `/proc/PID/stat`, parsed in one place for everyone who asks about a
//! process (its parent, whether it is a zombie, when it started). The
//! command name (field 2) may hold spaces and parentheses, so the fields
//! after it are counted from its last `)`.

/// The fields of one `/proc/PID/stat` line that Particle reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    /// The command name, without its parentheses.
    pub comm: String,
    /// `R`, `S`, `Z`, ...
    pub state: char,
    pub ppid: i32,
    /// Start time in clock ticks since boot (field 22), if the line has it.
    pub start_ticks: Option<u64>,
}

impl ProcStat {
    pub fn parse(text: &str) -> Option<Self> {
        let (open, close) = (text.find('(')?, text.rfind(')')?);
        let pid = text.get(..open)?.trim().parse().ok()?;
        let comm = text.get(open + 1..close)?.to_string();
        let mut rest = text.get(close + 1..)?.split_whitespace();
        let state = rest.next()?.chars().next()?;
        let ppid = rest.next()?.parse().ok()?;
        // Fields 5..=21 come before the start time.
        let start_ticks = rest.nth(17).and_then(|t| t.parse().ok());
        Some(Self {
            pid,
            comm,
            state,
            ppid,
            start_ticks,
        })
    }

    /// The process's line now, if it exists.
    pub fn of(pid: i32) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    pub fn is_zombie(&self) -> bool {
        self.state == 'Z'
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_names_and_the_start_time() {
        let line = "4242 (my (odd) proc) S 17 4242 4242 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 987654 100 20";
        let s = ProcStat::parse(line).unwrap();
        assert_eq!(
            (s.pid, s.comm.as_str(), s.state, s.ppid),
            (4242, "my (odd) proc", 'S', 17)
        );
        assert_eq!(s.start_ticks, Some(987654));
        let own = ProcStat::of(std::process::id() as i32).unwrap();
        assert!(own.start_ticks.is_some() && !own.is_zombie());
        assert_eq!(
            ProcStat::parse("7 (sh) Z 6").map(|s| s.is_zombie()),
            Some(true)
        );
    }
}
