//! The operator API (contract v1.2 "Operators"): pause and resume, the SKU listing,
//! `not_started` with its start, a PUT that refuses unknown fields, compensations paged
//! with a cursor and resolved with a refund reference, `/healthz` with the build.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{body, spawn_app, unique_sku, user_token, TestApp, SERVICE_TOKEN};

async fn post(app: &TestApp, path: &str) -> (StatusCode, Value) {
    body(
        app.client
            .post(app.url(path))
            .bearer_auth(SERVICE_TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn get(app: &TestApp, path: &str) -> (StatusCode, Value) {
    body(
        app.client
            .get(app.url(path))
            .bearer_auth(SERVICE_TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// A paused SKU refuses reserves (`409 paused`) while payments, cancels and replays go
/// on; pause and resume are idempotent; the pause is a term of sale MySQL keeps, so a
/// SKU Redis lost comes back paused.
#[tokio::test]
async fn a_paused_sku_refuses_reserves_and_lets_everything_else_go_on() {
    let app = spawn_app().await;
    for buckets in [1, 2] {
        let sku = unique_sku("paused");
        let definition = json!({"stock": 10, "per_user_limit": 2, "buckets": buckets});
        app.create_sku(&sku, definition.clone()).await;
        let (_, to_pay) = app.reserve(&sku, "payer", "k-pay", 1).await;
        let (_, to_cancel) = app.reserve(&sku, "canceller", "k-cancel", 1).await;
        for _ in 0..2 {
            let (status, view) = post(&app, &format!("/v1/admin/skus/{sku}/pause")).await;
            assert_eq!(
                (status, &view["paused"]),
                (StatusCode::OK, &json!(true)),
                "{view}"
            );
        }
        assert_eq!(app.sku(&sku).await["paused"], true);
        let (status, problem) = app.reserve(&sku, "newcomer", "k-new", 1).await;
        assert_eq!(
            (status, &problem["code"]),
            (StatusCode::CONFLICT, &json!("paused"))
        );
        // A replay of a key that made a hold still answers it.
        let replay = app.reserve_raw(&sku, "payer", "k-pay", 1).await;
        assert_eq!(replay.status(), StatusCode::CREATED);
        let paid = to_pay["reservation_id"].as_str().unwrap();
        assert_eq!(app.confirm(paid, "pay-1").await.0, StatusCode::OK);
        let cancelled = to_cancel["reservation_id"].as_str().unwrap();
        assert_eq!(
            app.cancel(cancelled, &user_token("canceller")).await.0,
            StatusCode::OK
        );
        // A PUT keeps the pause.
        app.create_sku(
            &sku,
            json!({"stock": 12, "per_user_limit": 2, "buckets": buckets}),
        )
        .await;
        assert_eq!(app.sku(&sku).await["paused"], true, "a PUT resumed it");
        // Redis loses the SKU; the reconciler rebuilds it from MySQL, paused.
        app.flush(&sku).await;
        let id = TestApp::sku_id(&sku);
        for sale in flashgate::buckets::sales(&id, buckets) {
            app.lose_sale(sale.as_str()).await;
        }
        flashgate::reconcile::run_skus(&app.store, &app.db, &[id], true)
            .await
            .unwrap();
        let (status, problem) = app.reserve(&sku, "newcomer", "k-new", 1).await;
        assert_eq!(
            (status, &problem["code"]),
            (StatusCode::CONFLICT, &json!("paused")),
            "rebuilt unpaused: {problem}"
        );
        for _ in 0..2 {
            let (status, view) = post(&app, &format!("/v1/admin/skus/{sku}/resume")).await;
            assert_eq!((status, &view["paused"]), (StatusCode::OK, &json!(false)));
        }
        let (status, _) = app.reserve(&sku, "newcomer", "k-new", 1).await;
        assert_eq!(status, StatusCode::CREATED);
        app.assert_stock_adds_up(&sku).await;
    }
    let (status, _) = post(
        &app,
        &format!("/v1/admin/skus/{}/pause", unique_sku("none")),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Users cannot pause.
    let response = app
        .client
        .post(app.url(&format!("/v1/admin/skus/{}/pause", unique_sku("x"))))
        .bearer_auth(user_token("u"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

/// Every SKU of the listing, page after page with the cursor, `state` filtered.
async fn listing(app: &TestApp, state: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/v1/admin/skus?state={state}&limit=1000");
        if let Some(after) = &after {
            path += &format!("&after={after}");
        }
        let (status, page) = get(app, &path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return items,
        }
    }
}

#[tokio::test]
async fn skus_are_listed_oldest_first_with_their_state_and_counters() {
    let app = spawn_app().await;
    let prefix = unique_sku("list");
    let named = |what: &str| format!("{prefix}-{what}");
    app.create_sku(&named("on"), json!({"stock": 3})).await;
    app.create_sku(
        &named("later"),
        json!({"stock": 3, "starts_at": "2999-01-01T00:00:00Z"}),
    )
    .await;
    app.create_sku(
        &named("over"),
        json!({"stock": 3, "starts_at": "2001-01-01T00:00:00Z", "ends_at": "2002-01-01T00:00:00Z"}),
    )
    .await;
    app.create_sku(&named("held"), json!({"stock": 3})).await;
    post(&app, &format!("/v1/admin/skus/{}/pause", named("held"))).await;
    app.hold(&named("on"), "lister").await;
    let ours = |items: &[Value]| -> Vec<(String, String)> {
        items
            .iter()
            .filter(|i| i["sku"].as_str().unwrap().starts_with(&prefix))
            .map(|i| {
                (
                    i["sku"]
                        .as_str()
                        .unwrap()
                        .trim_start_matches(&prefix)
                        .to_owned(),
                    i["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let all = listing(&app, "all").await;
    assert_eq!(
        ours(&all),
        [
            ("-on", "on_sale"),
            ("-later", "scheduled"),
            ("-over", "ended"),
            ("-held", "paused")
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned())),
        "oldest definition first"
    );
    let on = all.iter().find(|i| i["sku"] == named("on")).unwrap();
    assert_eq!(
        (on["held"].as_u64(), on["available"].as_u64()),
        (Some(1), Some(2))
    );
    for (state, what) in [
        ("on_sale", "-on"),
        ("scheduled", "-later"),
        ("ended", "-over"),
        ("paused", "-held"),
    ] {
        let found = ours(&listing(&app, state).await);
        assert_eq!(found, [(what.to_owned(), state.to_owned())], "{state}");
    }
    // Pages of one: each page's next leads to the following SKU.
    let (_, first) = get(&app, "/v1/admin/skus?limit=1").await;
    assert_eq!(first["items"].as_array().unwrap().len(), 1);
    let next = first["next"].as_str().unwrap();
    let (_, second) = get(&app, &format!("/v1/admin/skus?limit=1&after={next}")).await;
    assert_ne!(second["items"][0]["sku"], first["items"][0]["sku"]);
    for bad in ["state=soon", "limit=0", "limit=1001", "after=x", "after=-1"] {
        let (status, problem) = get(&app, &format!("/v1/admin/skus?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {problem}");
    }
}

#[tokio::test]
async fn not_started_says_when_the_sale_starts() {
    let app = spawn_app().await;
    let sku = unique_sku("soon");
    let starts = chrono::Utc::now() + chrono::Duration::seconds(90);
    let starts = starts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    app.create_sku(&sku, json!({"stock": 3, "starts_at": starts}))
        .await;
    let response = app.reserve_raw(&sku, "early", "k", 1).await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let (status, problem) = body(response).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::CONFLICT, &json!("not_started"))
    );
    assert_eq!(problem["starts_at"], json!(starts));
    assert!(
        (85..=90).contains(&retry_after),
        "Retry-After {retry_after}"
    );
}

#[tokio::test]
async fn a_put_with_a_field_it_does_not_know_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    let sku = unique_sku("strict");
    app.create_sku(&sku, json!({"stock": 3, "per_user_limit": 2}))
        .await;
    let (status, problem) = app
        .put_sku(&sku, json!({"stock": 5, "per_user_limt": 1}))
        .await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::BAD_REQUEST, &json!("invalid_request"))
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("per_user_limt"),
        "{problem}"
    );
    let view = app.sku(&sku).await;
    assert_eq!(
        (
            view["stock_total"].as_u64(),
            view["per_user_limit"].as_u64()
        ),
        (Some(3), Some(2))
    );
}

/// Compensations page with a stable cursor; a resolve records a refund reference and a
/// note (the first resolve's stay), also for one the flush had not written yet.
#[tokio::test]
async fn compensations_page_with_a_cursor_and_keep_the_refund_reference() {
    let app = spawn_app().await;
    let sku = unique_sku("refunds");
    app.create_sku(&sku, json!({"stock": 5})).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let rid = app.hold(&sku, &format!("u{n}")).await;
        app.cancel(&rid, SERVICE_TOKEN).await;
        let (status, problem) = app.confirm(&rid, "late").await;
        assert_eq!(status, StatusCode::CONFLICT);
        ids.push(problem["compensation_id"].as_str().unwrap().to_owned());
    }
    // Resolved before the flush wrote it: the reference goes with the resolve event.
    let resolve = |id: String, body: Value| {
        let app = &app;
        async move {
            crate::common::body(
                app.client
                    .post(app.url(&format!("/v1/compensations/{id}/resolve")))
                    .bearer_auth(SERVICE_TOKEN)
                    .json(&body)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let (status, first) = resolve(
        ids[0].clone(),
        json!({"refund_ref": "re_1", "note": "paid back"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(
        (first["status"].as_str(), first["refund_ref"].as_str()),
        (Some("resolved"), Some("re_1"))
    );
    assert!(first["resolved_at"].is_string());
    app.flush(&sku).await;
    // After the flush (MySQL's record), and resolved again with another reference.
    let (_, again) = resolve(ids[0].clone(), json!({"refund_ref": "re_other"})).await;
    assert_eq!(
        (again["refund_ref"].as_str(), again["note"].as_str()),
        (Some("re_1"), Some("paid back"))
    );
    let (status, plain) = post(&app, &format!("/v1/compensations/{}/resolve", ids[1])).await;
    assert_eq!(
        (status, &plain["refund_ref"]),
        (StatusCode::OK, &Value::Null)
    );
    for bad in [
        json!({"refund_ref": ""}),
        json!({"refund_ref": "a b"}),
        json!({"note": "x".repeat(501)}),
        json!({"refund": "r"}),
    ] {
        let (status, problem) = resolve(ids[2].clone(), bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {problem}");
    }
    let (_, open) = get(&app, &format!("/v1/compensations?sku={sku}&status=open")).await;
    assert_eq!(
        open["items"].as_array().unwrap().len(),
        1,
        "the bad resolves changed nothing"
    );
    // Pages of two: three items, then none left.
    let (_, page) = get(&app, &format!("/v1/compensations?sku={sku}&limit=2")).await;
    let first_page: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(first_page.len(), 2);
    let next = page["next"].as_str().unwrap();
    let (_, page) = get(
        &app,
        &format!("/v1/compensations?sku={sku}&limit=2&after={next}"),
    )
    .await;
    let second_page: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(second_page.len(), 1);
    assert!(page["next"].is_null());
    let mut seen: Vec<&str> = first_page.into_iter().chain(second_page).collect();
    seen.sort_unstable();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(seen, expected);
    let (status, _) = get(&app, "/v1/compensations?after=nonsense").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn healthz_names_the_version_and_the_build() {
    let app = spawn_app().await;
    let (status, health) = body(app.client.get(app.url("/healthz")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    assert!(!health["build"].as_str().unwrap().is_empty());
}

/// A repair never applies what an admin PUT takes back. A PUT commits MySQL's new stock,
/// then loads Redis, and puts MySQL's old stock back when Redis refuses (reserves took the
/// units a cut counted on). The reconciler's repair waits for the SKU's admin lock, so it
/// sees the stock the PUT leaves, never the one it took back (explorer `--queue --admin`
/// seed 4: a repair in between set Redis to 4 units, `overcommitted`, while MySQL went
/// back to 6, and 2 units were left unsold).
#[tokio::test]
async fn a_repair_waits_for_an_admin_put_and_never_applies_the_stock_it_takes_back() {
    use flashgate::db::SkuLock;
    let app = spawn_app().await;
    let sku = unique_sku("repair-vs-put");
    app.create_sku(&sku, json!({"stock": 6, "per_user_limit": 1}))
        .await;
    for buyer in 0..4 {
        app.hold(&sku, &format!("buyer-{buyer}")).await;
    }
    let id = TestApp::sku_id(&sku);
    // A PUT of 3 units half-way, as `Gateway::define_sku` runs it: the SKU's admin lock
    // held, MySQL's new stock committed (its check ran before the last hold), Redis not
    // loaded yet.
    let previous = flashgate::db::sku_record(&app.db, &id).await.unwrap();
    let mut admin = app.db.acquire().await.unwrap();
    admin.close_on_drop();
    SkuLock::acquire(&mut admin, &id).await.unwrap();
    sqlx::query("UPDATE skus SET stock_total = 3 WHERE sku = ?")
        .bind(id.as_str())
        .execute(&mut *admin)
        .await
        .unwrap();
    let repair = {
        let (store, db, id) = (app.store.clone(), app.db.clone(), id.clone());
        tokio::spawn(async move {
            flashgate::reconcile::run_skus(&store, &db, std::slice::from_ref(&id), true).await
        })
    };
    // The repair goes as far as it can while the PUT is half-way: to its end, or to the
    // admin lock (a session of this database waiting in GET_LOCK).
    let waiting_for_the_lock = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST
             WHERE DB = DATABASE() AND STATE = 'User lock' AND INFO LIKE '%GET_LOCK%'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap()
            > 0
    };
    while !repair.is_finished() && !waiting_for_the_lock().await {
        tokio::task::yield_now().await;
    }
    // Redis refuses the cut (4 units held): the PUT puts MySQL's stock back, lets go.
    flashgate::db::restore_sku(&mut admin, &id, previous.as_ref())
        .await
        .unwrap();
    SkuLock::release(&mut admin, &id).await.unwrap();
    let report = repair.await.unwrap().unwrap();
    let view = app.assert_stock_adds_up(&sku).await;
    assert_eq!(
        (&view["stock_total"], &view["available"], &view["held"]),
        (&json!(6), &json!(2), &json!(4)),
        "the repair applied the stock the PUT took back: {view}, {:?}",
        report.findings
    );
    assert!(!report.drift_found(), "{:?}", report.findings);
}
