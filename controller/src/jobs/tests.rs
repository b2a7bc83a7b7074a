//! The jobs table: agents restarting, and jobs kept across a restart.
use super::*;

fn running_job(jobs: &Jobs, id: &str, instance: &str) {
    jobs.register(record(id, 4, instance)).unwrap();
}

/// A running job of `n` functions over two nodes.
fn record(id: &str, n: usize, instance: &str) -> JobRecord {
    let functions = (0..n)
        .map(|rank| FunctionStatus {
            rank,
            node: format!("n{}", rank % 2),
            address: Some(std::net::Ipv4Addr::from(0x0a01_0000 + rank as u32)),
            state: FunctionState::Running,
            exit_code: None,
            cold: false,
            bound: false,
            error: None,
            output: None,
            reason: None,
        })
        .collect();
    JobRecord {
        job: Job {
            id: id.into(),
            tenant: "t".into(),
            state: JobState::Running,
            functions,
            warm: n,
            bound: 0,
            cold: 0,
            launch_ms: 1.0,
            duration_ms: None,
        },
        started_unix_ms: unix_ms(),
        agents: ["n0", "n1"]
            .map(|n| (n.to_string(), SocketAddr::from(([10, 0, 0, 1], 9101))))
            .into(),
        instances: [("n0", instance), ("n1", instance)]
            .map(|(n, i)| (n.to_string(), i.to_string()))
            .into(),
        seq: 0,
    }
}

fn exit(job: &str, rank: usize, code: i32) -> FunctionExit {
    FunctionExit {
        job: job.into(),
        rank,
        exit_code: Some(code),
        error: None,
        output: "out".into(),
        reason: None,
    }
}

#[test]
fn a_restarted_agent_loses_only_its_own_running_functions() {
    let jobs = Jobs::default();
    running_job(&jobs, "j1", "first");
    jobs.agent_registered("n1", "first"); // a re-registration: nothing lost
    assert_eq!(jobs.get("j1").unwrap().state, JobState::Running);
    jobs.record_exits("n0", vec![exit("j1", 0, 0)]).unwrap();
    jobs.agent_registered("n0", "second"); // n0 restarted
    let job = jobs.get("j1").unwrap();
    let states: Vec<_> = job.functions.iter().map(|f| f.state).collect();
    use FunctionState::*;
    assert_eq!(states, [Exited, Running, Lost, Running]);
    assert!(job.functions[2]
        .error
        .as_deref()
        .unwrap()
        .contains("restarted"));
    jobs.record_exits("n1", vec![exit("j1", 1, 0), exit("j1", 3, 0)])
        .unwrap();
    assert_eq!(jobs.get("j1").unwrap().state, JobState::Failed);
}

#[test]
fn jobs_survive_a_restart_without_their_output() {
    let dir = std::env::temp_dir().join(format!("particle-jobs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = || -> Arc<dyn Backend> {
        Arc::new(crate::store::JsonStore::open(&dir.join("state.json")).unwrap())
    };
    let jobs = Jobs::new(Some(store()));
    let id = jobs.new_id().unwrap();
    running_job(&jobs, "j1", "a");
    jobs.record_exits("n0", vec![exit("j1", 0, 0)]).unwrap();
    let next = jobs.lock().next;
    drop(jobs);

    let again = Jobs::new(Some(store()));
    again.reload().unwrap();
    let job = again.get("j1").expect("the running job is restored");
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.functions[0].state, FunctionState::Exited);
    assert_eq!(job.functions[0].output, None, "output is not stored");
    assert_eq!(again.lock().next, next, "ids go on where they stopped");
    assert_ne!(again.new_id().unwrap(), id);
    // Exits reported after the restart find the job and end it.
    again
        .record_exits("n1", vec![exit("j1", 1, 0), exit("j1", 3, 1)])
        .unwrap();
    again.record_exits("n0", vec![exit("j1", 2, 0)]).unwrap();
    let ended = again.get("j1").unwrap();
    assert_eq!(ended.state, JobState::Failed);
    assert_eq!(ended.functions[3].exit_code, Some(1));
    drop(again);
    // The end is stored too, and each change was one small record.
    let third = Jobs::new(Some(store()));
    third.reload().unwrap();
    assert_eq!(third.get("j1").unwrap().state, JobState::Failed);
    let log = std::fs::read_to_string(dir.join("state.json.jobs.log")).unwrap();
    assert_eq!(log.lines().count(), 1, "compacted at start");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_large_job_is_stored_once_in_chunks_and_each_change_is_small() {
    let mut job = record("big", 100_000, "a");
    let launch = records::launch_records(&job);
    let total: usize = launch.iter().map(|(_, v)| v.len()).sum();
    let largest = launch.iter().map(|(_, v)| v.len()).max().unwrap();
    // Once, at launch; each record well under etcd's 1.5 MiB request limit.
    assert!(total < 3_000_000, "{total} bytes at launch");
    assert!(largest < 200_000, "{largest} bytes in one record");
    // A report of 1,000 clean exits, and 10 that failed.
    let mut changes: Vec<Change> = (0..1000)
        .map(|rank| Change {
            rank,
            state: FunctionState::Exited,
            code: Some(0),
            error: None,
            reason: None,
        })
        .collect();
    changes.extend((1000..1010).map(|rank| Change {
        rank,
        state: FunctionState::Exited,
        code: Some(3),
        error: Some("boom".into()),
        reason: None,
    }));
    let delta = records::delta_record("big", 0, &changes);
    assert!(
        delta.1.len() < 6_000,
        "{} bytes for 1,010 exits",
        delta.1.len()
    );
    // And they read back as the same job.
    let mut stored = launch;
    stored.push(delta);
    let (jobs, _) = records::load(stored);
    for c in &changes {
        c.apply(&mut job.job.functions[c.rank]);
    }
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].job, job.job);
    assert_eq!(jobs[0].seq, 1);
}

#[test]
fn the_jobs_file_of_an_earlier_version_is_imported_once() {
    let dir = std::env::temp_dir().join(format!("particle-legacy-jobs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut running = record("j1", 4, "a");
    running.job.functions[0].state = FunctionState::Exited;
    running.job.functions[0].exit_code = Some(0);
    let mut ended = record("j2", 2, "a");
    for f in &mut ended.job.functions {
        f.state = FunctionState::Exited;
        f.exit_code = Some(1);
    }
    ended.job.state = JobState::Failed;
    let entry = |r: &JobRecord| {
        serde_json::json!({
            "job": r.job, "started_unix_ms": r.started_unix_ms,
            "agents": r.agents, "instances": r.instances,
        })
    };
    // What the earlier jobs file held: the whole table.
    let legacy = serde_json::json!({
        "next": 9,
        "jobs": { "j1": entry(&running), "j2": entry(&ended) },
        "ended": ["j2"],
    });
    let file = dir.join("state.json.jobs");
    std::fs::write(&file, legacy.to_string()).unwrap();
    let store: Arc<dyn Backend> =
        Arc::new(crate::store::JsonStore::open(&dir.join("state.json")).unwrap());
    let jobs = Jobs::new(Some(store.clone()));
    assert!(jobs.import_legacy(&file).unwrap());
    assert!(!file.exists() && dir.join("state.json.jobs.imported").exists());
    assert!(!jobs.import_legacy(&file).unwrap(), "once");
    jobs.reload().unwrap();
    assert_eq!(jobs.get("j1").unwrap(), running.job);
    assert_eq!(jobs.get("j2").unwrap(), ended.job);
    assert_eq!(jobs.lock().next, 9);
    // The running one goes on: its last exits end it.
    let exits = (1..4).map(|rank| exit("j1", rank, 0)).collect();
    jobs.record_exits("n1", exits).unwrap_or_default();
    jobs.record_exits("n0", vec![exit("j1", 2, 0)]).unwrap();
    assert_eq!(jobs.get("j1").unwrap().state, JobState::Succeeded);
    std::fs::remove_dir_all(&dir).unwrap();
}
