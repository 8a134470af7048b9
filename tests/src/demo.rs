//! The demo's server: the test server with something to watch, for the `qiod-demo` binary
//! (the daemon and this server in one process), so a newcomer sees events flow without
//! setting up a server.
//!
//! The server listens on a free loopback port. One task broadcasts a counter on
//! [`TICK_PATH`], so subscribing there shows events at once; another asks the subscribers
//! of [`QUESTION_PATH`] a question now and then (an event with a server callback), so a
//! client that answers the server's requests (`examples/python/answer_requests.py`) has
//! something to answer. It lives here, not in qiod, so that the shipped daemon carries no
//! test server; and in the library rather than the binary so that tests can run the demo
//! in-process and read the server's log.

use crate::{ServerConfig, TestServer};
use std::io::Write;
use std::path::Path;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

/// Where the counter is broadcast.
pub const TICK_PATH: &str = "/demo/tick";

/// Whose subscribers the server asks questions.
pub const QUESTION_PATH: &str = "/demo/question";

/// How often the demo broadcasts and asks.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Between two ticks on [`TICK_PATH`].
    pub tick: Duration,
    /// Between two questions to the subscribers of [`QUESTION_PATH`].
    pub question: Duration,
}

impl Default for Timing {
    /// Slow enough to read along: a tick every half second, a question every two seconds.
    fn default() -> Timing {
        Timing {
            tick: Duration::from_millis(500),
            question: Duration::from_secs(2),
        }
    }
}

/// The running test server and its two tasks.
pub struct Demo {
    server: TestServer,
    tasks: Vec<JoinHandle<()>>,
    timing: Timing,
}

impl Demo {
    /// Starts the test server on `127.0.0.1`, port 0, with the default [`Timing`].
    pub async fn start() -> std::io::Result<Demo> {
        Demo::start_with(Timing::default()).await
    }

    /// Starts the test server on `127.0.0.1`, port 0, the counter and the questions.
    pub async fn start_with(timing: Timing) -> std::io::Result<Demo> {
        let server = TestServer::start(ServerConfig::default()).await?;
        let tasks = vec![
            tokio::spawn(broadcast_ticks(server.clone(), timing.tick)),
            tokio::spawn(ask_questions(server.clone(), timing.question)),
        ];
        Ok(Demo {
            server,
            tasks,
            timing,
        })
    }

    /// The test server's address, to use as the daemon's only server.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The test server itself, whose log shows the answers it got.
    pub fn server(&self) -> &TestServer {
        &self.server
    }

    /// Tells the person who ran the demo where things are and what to type, once the
    /// daemon listens on `socket`. On stdout, like the test server's own `listening on`
    /// line, so a script can read it too.
    pub fn announce(&self, socket: &Path) {
        let socket = socket.display();
        let hint = format!(
            "qiod demo: try\n    socat - UNIX-CONNECT:{socket}\n    \
             {{\"op\":\"on\",\"path\":\"{TICK_PATH}\",\"id\":1}}\n"
        );
        let url = self.url();
        let Timing { tick, question } = self.timing;
        tracing::info!(
            server = %url, %socket,
            "demo: broadcasting {TICK_PATH} every {tick:?}, asking {QUESTION_PATH} every {question:?}"
        );
        let mut out = std::io::stdout().lock();
        // stdout may be closed; the log line above says the same.
        let _ = write!(
            out,
            "qiod demo: Quick.IO test server on {} broadcasts a counter on {TICK_PATH} every {} ms\n\
             qiod demo: and asks the subscribers of {QUESTION_PATH} a question every {} ms\n\
             qiod demo: local clients connect to {socket}\n{hint}",
            url,
            tick.as_millis(),
            question.as_millis(),
        );
        let _ = out.flush();
    }

    /// Stops the tasks and the server (after the daemon has let go of it).
    pub async fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
        self.server.shutdown().await;
    }
}

/// Broadcasts 1, 2, 3, ... to every subscriber of [`TICK_PATH`] until aborted.
async fn broadcast_ticks(server: TestServer, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        server.broadcast(TICK_PATH, serde_json::json!(n)).await;
    }
}

/// Asks the subscribers of [`QUESTION_PATH`] `{"n": 1, "question": "what is 1 + 1?"}`, then
/// 2, 3, ... until aborted; the number counts only questions that reached someone.
async fn ask_questions(server: TestServer, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut n: u64 = 1;
    loop {
        tick.tick().await;
        let question = serde_json::json!({"n": n, "question": format!("what is {n} + {n}?")});
        if server.request_subscribers(QUESTION_PATH, question).await > 0 {
            n += 1;
        }
    }
}
