//! The accept loop: HTTP/1.1 and HTTP/2 over plain TCP or TLS, blob
//! downloads on plain HTTP/1 connections sent by `sendfile`
//! ([`crate::zero_copy`]), and a graceful stop that lets requests in
//! flight finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::zero_copy::ZeroCopy;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long requests in flight may run on after a stop was asked for.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` (over TLS when `tls` is given) until
/// `shutdown` completes, then waits (bounded) for the connections still open.
pub async fn serve(listener: TcpListener, router: Router, tls: Option<Arc<ServerConfig>>, shutdown: impl Future<Output = ()>) {
    let acceptor = tls.map(TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Body chunks must reach the socket as they are, not copied into one
    // buffer: zero_copy recognises its chunks by address.
    builder.http1().writev(true);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Nagle's algorithm would hold back the end of every response
        // (and of every `sendfile` that is not whole TCP segments) until
        // the client acknowledged what went before; see
        // `zero_copy::whole_tcp_segments` for what that did to a pull herd.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let outcome = match acceptor {
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let service = TowerToHyperService::new(router);
                    watcher.watch(builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned()).await
                }
                None => {
                    let (zero_copy, stream) = ZeroCopy::connection(stream);
                    let service = TowerToHyperService::new(router.map_request(move |mut request: Request<hyper::body::Incoming>| {
                        request.extensions_mut().insert(zero_copy.clone());
                        request
                    }));
                    watcher.watch(builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned()).await
                }
            };
            if let Err(error) = outcome {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; stopping anyway");
    }
}
