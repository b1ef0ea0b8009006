//! An HTTP(S) source: redirects followed, a CA bundle trusted, transient
//! failures (5xx, 429, a connection lost) retried with backoff, and a
//! transfer cut mid-way resumed with a `Range` request from where it
//! stopped when the server supports ranges.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::{Response, StatusCode};
use tokio::sync::mpsc;

use crate::ImportError;

/// Retry settings.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub retries: u32,
    /// Delay before the first retry; doubled each time, at most 30 s.
    pub first_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 5,
            first_delay: Duration::from_secs(1),
        }
    }
}

/// An opened HTTP download.
pub struct HttpSource {
    client: reqwest::Client,
    url: String,
    response: Response,
    /// Content-Length of the whole body, when the server sent it.
    pub length: Option<u64>,
    ranges: bool,
    policy: RetryPolicy,
}

fn transient(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT
}

impl HttpSource {
    /// Sends the GET, retrying transient failures.
    pub async fn open(client: reqwest::Client, url: &str, policy: RetryPolicy) -> Result<Self, ImportError> {
        let mut delay = policy.first_delay;
        let mut attempt = 0;
        loop {
            let outcome = client.get(url).send().await;
            let retry_reason = match outcome {
                Ok(response) if response.status() == StatusCode::OK => {
                    let length = response
                        .headers()
                        .get(CONTENT_LENGTH)
                        .and_then(|value| value.to_str().ok())
                        .and_then(|value| value.parse().ok());
                    let ranges = response
                        .headers()
                        .get(ACCEPT_RANGES)
                        .and_then(|value| value.to_str().ok())
                        .is_some_and(|value| value.contains("bytes"));
                    return Ok(HttpSource {
                        client,
                        url: url.to_string(),
                        response,
                        length,
                        ranges,
                        policy,
                    });
                }
                Ok(response) if transient(response.status()) => format!("HTTP {}", response.status()),
                Ok(response) => {
                    return Err(ImportError::HttpStatus {
                        url: url.to_string(),
                        status: response.status().as_u16(),
                    })
                }
                Err(error) if error.is_connect() || error.is_timeout() => {
                    if is_tls_problem(&error) {
                        return Err(ImportError::Http(url.to_string(), error_chain(&error)));
                    }
                    error_chain(&error)
                }
                Err(error) => return Err(ImportError::Http(url.to_string(), error_chain(&error))),
            };
            if attempt >= policy.retries {
                return Err(ImportError::GaveUp {
                    url: url.to_string(),
                    attempts: attempt + 1,
                    last: retry_reason,
                });
            }
            attempt += 1;
            tracing::warn!(%url, attempt, reason = %retry_reason, "transient failure, retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// The last `bytes` of the body by a `Range` request, when the server
    /// supports ranges; `None` otherwise or on any failure (it is a hint).
    pub async fn tail(&self, bytes: u64) -> Option<Vec<u8>> {
        let length = self.length?;
        if !self.ranges || length == 0 {
            return None;
        }
        let start = length.saturating_sub(bytes);
        let response = self
            .client
            .get(&self.url)
            .header(RANGE, format!("bytes={start}-{}", length - 1))
            .send()
            .await
            .ok()?;
        if response.status() != StatusCode::PARTIAL_CONTENT {
            return None;
        }
        let body = response.bytes().await.ok()?;
        (body.len() as u64 == length - start).then(|| body.to_vec())
    }

    /// Sends the body into `sender`, resuming after a lost connection when
    /// the server supports ranges. Ends with an `Err` item on failure.
    pub async fn pump(mut self, sender: mpsc::Sender<io::Result<Bytes>>) {
        if let Err(error) = self.pump_inner(&sender).await {
            let _ = sender.send(Err(io::Error::other(error))).await;
        }
    }

    async fn pump_inner(&mut self, sender: &mpsc::Sender<io::Result<Bytes>>) -> Result<(), String> {
        let mut received = 0u64;
        let mut resumes = 0;
        let mut delay = self.policy.first_delay;
        loop {
            let failure = loop {
                match self.response.chunk().await {
                    Ok(Some(chunk)) => {
                        received += chunk.len() as u64;
                        if sender.send(Ok(chunk)).await.is_err() {
                            return Ok(()); // the pipeline stopped; it reports why
                        }
                    }
                    Ok(None) => match self.length {
                        Some(length) if received < length => {
                            break format!("the connection closed after {received} of {length} bytes");
                        }
                        _ => return Ok(()),
                    },
                    Err(error) => break format!("the transfer broke after {received} bytes: {}", error_chain(&error)),
                }
            };
            if self.length.is_none() {
                return Err(format!(
                    "{failure}; the server sent no Content-Length, so the download cannot resume: retry the import"
                ));
            }
            if !self.ranges {
                return Err(format!(
                    "{failure}; the server does not support Range requests, so the download cannot resume: retry the import"
                ));
            }
            if resumes >= self.policy.retries {
                return Err(format!("{failure}; gave up after {resumes} resumptions"));
            }
            resumes += 1;
            tracing::warn!(url = %self.url, received, reason = %failure, "resuming with a Range request");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
            match self.resume(received).await {
                Ok(response) => self.response = response,
                Err(reason) => return Err(format!("{failure}; resuming failed: {reason}")),
            }
        }
    }

    async fn resume(&self, from: u64) -> Result<Response, String> {
        let response = self
            .client
            .get(&self.url)
            .header(RANGE, format!("bytes={from}-"))
            .send()
            .await
            .map_err(|error| error_chain(&error))?;
        if response.status() != StatusCode::PARTIAL_CONTENT {
            return Err(format!("the server answered HTTP {} to a Range request", response.status()));
        }
        let start = response
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("bytes "))
            .and_then(|value| value.split('-').next())
            .and_then(|value| value.parse::<u64>().ok());
        if start != Some(from) {
            return Err(format!("the server resumed at {start:?} instead of {from}"));
        }
        Ok(response)
    }
}

fn is_tls_problem(error: &reqwest::Error) -> bool {
    let chain = error_chain(error).to_ascii_lowercase();
    chain.contains("certificate") || chain.contains("tls") || chain.contains("handshake")
}

/// An error with its causes, which is where reqwest says what happened.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
