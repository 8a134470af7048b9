//! Sends a request and follows the server's answers back and forth: `/clienttest/echo`
//! answers with the data sent and asks for an answer to its answer, so each reply carries
//! a handle to go on with.
//!
//! ```sh
//! QIOD_SOCKET=/tmp/qiod-test/qiod.sock cargo run -p qio-client --example request_reply
//! ```

use qio_client::Client;
use serde_json::json;
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), qio_client::Error> {
    let client = Client::builder()
        .request_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let mut reply = client.send("/clienttest/echo", json!({"step": 1})).await?;
    println!("{} {}", reply.code, reply.data);
    for step in 2..=3 {
        if reply.handle.is_none() {
            break;
        }
        reply = reply.answer_and_wait(json!({"step": step})).await?;
        println!("{} {}", reply.code, reply.data);
    }
    // Codes other than 200 are replies too, not errors.
    let refused = client.send("/clienttest/error/404", ()).await?;
    println!("{} {:?}", refused.code, refused.err_msg);
    Ok(())
}
