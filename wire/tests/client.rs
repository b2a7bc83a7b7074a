//! The API client of several controllers, over real loopback sockets: it
//! follows a follower's 503 to the leader it names, skips a controller that
//! refuses connections, keeps going to the leader it found, and gives up on
//! a final answer (a plain 503 or a 4xx is not sent again).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use particle_wire::client::{ApiClient, Controllers, Method, LEADER_HEADER};

/// A port nobody listens on (bound, then closed).
async fn closed_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

async fn serve(app: Router) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

/// Counts the requests it gets; answers `answer`.
async fn controller(
    hits: Arc<AtomicUsize>,
    answer: impl Fn() -> axum::response::Response + Clone + Send + Sync + 'static,
) -> SocketAddr {
    let app = Router::new().route(
        "/v1/x",
        post(move || {
            hits.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            async move { answer() }
        }),
    );
    serve(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_finds_the_leader_and_stays_with_it() {
    let (to_leader, to_follower) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let leader = controller(to_leader.clone(), || {
        (StatusCode::OK, "\"done\"").into_response()
    })
    .await;
    let named = leader.to_string();
    let follower = controller(to_follower.clone(), move || {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(LEADER_HEADER, named.clone())],
            "{\"error\":\"follows\"}",
        )
            .into_response()
    })
    .await;
    let dead = closed_port().await;
    let api = ApiClient::direct_to_any(vec![dead, follower, leader], "t".into());
    let answer: String = api
        .call::<(), _>(Method::POST, "/v1/x", None)
        .await
        .unwrap();
    assert_eq!(answer, "done");
    assert_eq!(api.addr(), leader);
    assert_eq!(
        to_follower.load(Ordering::SeqCst),
        1,
        "asked once, then the leader it named"
    );
    let _: String = api
        .call::<(), _>(Method::POST, "/v1/x", None)
        .await
        .unwrap();
    assert_eq!(
        to_follower.load(Ordering::SeqCst),
        1,
        "the leader is asked first from then on"
    );
    assert_eq!(to_leader.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_answer_is_not_sent_again() {
    let hits = Arc::new(AtomicUsize::new(0));
    // A 503 without the leader header is the controller's own answer (etcd away).
    let busy = controller(hits.clone(), || {
        (StatusCode::SERVICE_UNAVAILABLE, "{\"error\":\"etcd\"}").into_response()
    })
    .await;
    let other = controller(hits.clone(), || {
        (StatusCode::OK, "\"done\"").into_response()
    })
    .await;
    let api = ApiClient::direct_to_any(vec![busy, other], "t".into());
    let e = api
        .call::<(), String>(Method::POST, "/v1/x", None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[test]
fn controller_lists_parse_and_print() {
    let c: Controllers = "10.0.0.1:7700, 10.0.0.2:7700".parse().unwrap();
    assert_eq!(c.0.len(), 2);
    assert_eq!(c.to_string(), "10.0.0.1:7700,10.0.0.2:7700");
    assert!("10.0.0.1".parse::<Controllers>().is_err());
    assert!("".parse::<Controllers>().is_err());
    assert!("10.0.0.1:7700,".parse::<Controllers>().is_err());
}
