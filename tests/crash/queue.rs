//! The waiting room when a gateway dies (issue 26): buyers join through two gateways,
//! one is SIGKILLed while joins and admissions run through it; every buyer retries on
//! the other. Each still has one place, the places are 1..n, no more admissions than
//! units were made, a token signed by the dead gateway buys on the other, and the
//! sale sells out with half of the admitted buyers walking away.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

use crate::common::{self, unique_sku, user_token};
use crate::many_gateways::{answer, define_sku, service_post, start_gateway};
use crate::support::*;

const STOCK: u64 = 20;
const BUYERS: usize = 300;

async fn queue_call(
    client: &Client,
    base: &str,
    sku: &str,
    user: &str,
    join: bool,
) -> reqwest::Result<(StatusCode, Value)> {
    let url = format!("{base}/v1/skus/{sku}/queue");
    let request = if join {
        client.post(url)
    } else {
        client.get(url)
    };
    let response = request.bearer_auth(user_token(user)).send().await?;
    Ok(answer(response).await)
}

/// The unused admissions (user -> admitted_until) and `available`, read together.
async fn admissions_and_available(redis: &RedisServer, sku: &str) -> (HashMap<String, i64>, u64) {
    let keys = flashgate::keys::SkuKeys::new(&flashgate::ids::SkuId::parse(sku).unwrap());
    let mut conn = redis.client().await;
    let (admits, available): (Vec<(String, i64)>, u64) = redis::pipe()
        .atomic()
        .cmd("ZRANGE")
        .arg(keys.queue_admits())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .cmd("HGET")
        .arg(&keys.meta)
        .arg("available")
        .query_async(&mut conn)
        .await
        .unwrap();
    (admits.into_iter().collect(), available)
}

#[tokio::test]
async fn a_gateway_killed_mid_admission_leaves_one_place_per_buyer_and_no_unit_promised_twice() {
    let redis = RedisServer::start(None).await;
    let database_url = common::database_url();
    shared_db().await;
    let mut doomed = start_gateway(&redis.url(), &database_url).await;
    let survivor = start_gateway(&redis.url(), &database_url).await;
    common::tls_provider();
    let client = Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap();
    let sku = unique_sku("queue-kill");
    define_sku(
        &client,
        &survivor,
        &sku,
        json!({"stock": STOCK, "hold_seconds": 60, "waiting_room": {"admission_seconds": 60}}),
    )
    .await;

    // Every buyer joins through the doomed gateway first; it is SIGKILLed as the
    // third of them is answered, with up to 31 more joins (and their admissions) under
    // way inside it.
    let doomed_base = doomed.base.clone();
    let answered_so_far = AtomicUsize::new(0);
    let joins = futures::stream::iter(0..BUYERS)
        .map(|i| {
            let (client, base, sku) = (client.clone(), doomed_base.clone(), sku.clone());
            let (answered_so_far, doomed) = (&answered_so_far, &doomed);
            async move {
                let ok = queue_call(&client, &base, &sku, &format!("buyer-{i}"), true)
                    .await
                    .is_ok();
                if ok && answered_so_far.fetch_add(1, Ordering::SeqCst) + 1 == BUYERS / 3 {
                    doomed.proc.signal("KILL");
                }
                ok
            }
        })
        .buffer_unordered(32);
    let answered = joins.collect::<Vec<bool>>().await;
    doomed.proc.kill(); // reaped
    let through_doomed = answered.iter().filter(|ok| **ok).count();
    assert!(
        through_doomed < BUYERS,
        "the gateway died after every join: kill earlier"
    );

    // Everyone joins (again) through the survivor: the same place for those who had one.
    let mut tickets = Vec::new();
    for i in 0..BUYERS {
        let (status, ticket) =
            queue_call(&client, &survivor.base, &sku, &format!("buyer-{i}"), true)
                .await
                .unwrap();
        assert_eq!(status, StatusCode::OK, "{ticket}");
        tickets.push(ticket);
    }
    let positions: HashSet<u64> = tickets
        .iter()
        .map(|t| t["position"].as_u64().unwrap())
        .collect();
    assert_eq!(
        positions,
        (1..=BUYERS as u64).collect::<HashSet<u64>>(),
        "one place each, 1..n"
    );
    let (admits, available) = admissions_and_available(&redis, &sku).await;
    assert_eq!(
        admits.len() as u64,
        STOCK,
        "as many admissions as units, no more"
    );
    assert_eq!(available, STOCK);

    // Half of the admitted buy, with the token whichever gateway signed it; half walk
    // away. Their admissions lapse (time made fast: the deadlines are moved to the past,
    // as admission_seconds going by would) and the next buyers are admitted.
    let mut sold = 0;
    let mut bought = HashSet::new();
    let mut round = 0;
    while sold < STOCK {
        round += 1;
        assert!(round <= 20, "the sale did not sell out");
        let mut walked_away = Vec::new();
        for (i, ticket) in tickets.iter_mut().enumerate() {
            let user = format!("buyer-{i}");
            let (_, now) = queue_call(&client, &survivor.base, &sku, &user, false)
                .await
                .unwrap();
            *ticket = now;
            if ticket["state"] != "admitted" || bought.contains(&user) {
                continue;
            }
            let token = ticket["admission_token"].as_str().unwrap().to_owned();
            if i % 2 == 0 {
                walked_away.push(user);
                continue;
            }
            let (status, hold) = answer(
                client
                    .post(format!("{}/v1/skus/{sku}/reservations", survivor.base))
                    .bearer_auth(user_token(&user))
                    .header("Idempotency-Key", "k")
                    .header("Admission-Token", token)
                    .json(&json!({}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED, "{hold}");
            let rid = hold["reservation_id"].as_str().unwrap();
            let (status, paid) = service_post(
                &client,
                format!("{}/v1/reservations/{rid}/confirm", survivor.base),
                json!({"payment_ref": format!("pay-{user}")}),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{paid}");
            bought.insert(user);
            sold += 1;
            let (admits, available) = admissions_and_available(&redis, &sku).await;
            assert!(
                admits.len() as u64 <= available,
                "{} admissions, {available} free",
                admits.len()
            );
        }
        let keys = flashgate::keys::SkuKeys::new(&flashgate::ids::SkuId::parse(&sku).unwrap());
        let mut conn = redis.client().await;
        for user in walked_away {
            let _: () = redis::cmd("ZADD")
                .arg(keys.queue_admits())
                .arg("XX")
                .arg(1)
                .arg(user)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    let store = flashgate::store::Store::new(
        flashgate::store::connect(&common::serve_args(&redis.url(), "").redis)
            .await
            .unwrap(),
    );
    let (total, _, _, sold_now) = assert_equation(&store, &sku).await;
    assert_eq!((total, sold_now), (STOCK, STOCK));
    // Everyone still waiting is told.
    let (_, last) = queue_call(
        &client,
        &survivor.base,
        &sku,
        &format!("buyer-{}", BUYERS - 1),
        false,
    )
    .await
    .unwrap();
    assert_eq!(last["state"], "sold_out", "{last}");
}
