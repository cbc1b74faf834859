#![doc = include_str!("../README.md")]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod cases;
mod faulty;
mod harness;
#[cfg(feature = "memory")]
mod memory;

pub use faulty::{Faulty, Op};
pub use harness::{
    CASE_TIMEOUT, Case, CaseError, CaseFn, CaseResult, Client, Ctx, Factory, HeldAppend, Namespace,
    Spec, TestDatabase, WAIT, connect, keep_last, run_case, run_test, sentinel, test_options,
    until_after_jobs, wait_event,
};
#[cfg(feature = "memory")]
pub use memory::MemoryFactory;

/// Calls `$callback! { $args; module::case [spec], ... }` (spec: a stream count or `restarts`) with every case of the suite.
///
/// This list is the single source of the suite: [`cases()`] and [`suite!`] both expand it.
#[doc(hidden)]
#[macro_export]
macro_rules! for_each_case {
    ($callback:path, $($args:tt)*) => {
        $callback! {
            $($args)*;
            messaging::broadcast_reaches_all_local_connections,
            messaging::broadcast_skips_disconnected_connection,
            messaging::connection_send_reaches_connection,
            messaging::broadcast_reaches_every_node_once,
            messaging::broadcast_across_nodes_skips_disconnected,
            messaging::connection_send_from_other_node,
            messaging::local_connection_send_skips_log,
            messaging::send_to_failing_remote_connection_is_ok,
            messaging::user_send_reaches_all_user_connections,
            messaging::user_still_reached_after_one_connection_disconnects,
            messaging::connection_send_to_unknown_connection_errors,
            messaging::except_list_on_broadcast,
            messaging::connection_reused_with_new_user_rekeys,
            messaging::payload_bytes_cross_unchanged,
            messaging::per_sender_order_at_every_node,
            messaging::subscribe_while_publishing,
            messaging::slow_consumer_sees_no_gap,
            groups::group_send_reaches_members_only,
            groups::group_send_except_skips_excluded,
            groups::group_send_from_node_without_members,
            groups::disconnect_removes_group_membership,
            groups::remove_local_not_member_is_noop,
            groups::remove_remote_not_member_is_noop,
            groups::add_remote_connection_to_group,
            groups::add_local_already_member_is_noop,
            groups::add_remote_already_member_is_noop,
            groups::remove_remote_connection_from_group,
            groups::group_with_failing_member_still_delivers,
            groups::group_members_and_connection_groups_listed,
            groups::add_unknown_connection_to_group_errors,
            groups::multiple_groups_deliver_once,
            groups::group_change_reaches_the_owner_after_a_failed_record,
            groups::group_change_while_connecting_is_kept [1],
            client_results::client_result_local,
            client_results::client_result_error_local,
            client_results::client_result_wrong_connection_refused,
            client_results::client_result_unknown_connection,
            client_results::client_results_do_not_collide,
            client_results::client_result_fails_on_disconnect,
            client_results::client_result_cancel_ignores_late_result,
            client_results::client_result_across_nodes,
            client_results::client_result_error_across_nodes,
            client_results::client_result_unknown_connection_multi_node,
            client_results::client_result_fails_on_disconnect_other_node,
            client_results::invocation_ids_unique_across_nodes,
            client_results::client_result_wrong_type_across_nodes,
            client_results::client_result_fails_when_node_dies,
            client_results::completion_survives_a_failed_append,
            presence::presence_user_online_and_connections,
            presence::presence_online_users,
            presence::presence_removed_on_disconnect,
            presence::closed_connections_stay_registered_until_they_disconnect,
            presence::user_session_lifecycle,
            presence::reaping_waits_for_other_nodes_after_an_outage,
            presence::dead_node_is_reaped,
            presence::reaped_node_registers_again,
            presence::live_nodes_listed,
            presence::node_addresses_listed,
            presence::restarted_node_drops_its_previous_connections,
            presence::reap_removes_connections_of_unregistered_nodes,
            presence::connection_removed_only_by_its_node,
            presence::orphan_retry_spares_the_id_on_another_node,
            presence::removal_while_reaped_is_not_undone,
            durable::durable_offline_user_receives_on_connect_once,
            durable::durable_online_user_receives_live,
            durable::durable_ack_stops_redelivery,
            durable::durable_expired_never_delivered_and_purged,
            durable::durable_attempts_recorded,
            durable::durable_stored_before_send,
            durable::durable_requires_user_target,
            durable::durable_expired_in_log_not_delivered,
            durable::durable_acknowledged_on_one_node_still_reaches_the_other,
            durable::acknowledged_durable_not_redelivered_by_a_lagging_node,
            durable::pending_delivery_survives_a_failed_attempt_record,
            durable::durable_publish_survives_a_failed_append,
            log::log_offsets_gap_free_in_commit_order,
            log::log_replay_from_position,
            log::log_position_too_old_after_trim,
            log::concurrent_trims_count_each_entry_once,
            log::trim_cut_short_does_not_block_the_next,
            log::log_position_of_other_epoch_too_old,
            log::log_position_past_end_too_old,
            log::log_rewind_rereads_without_duplicates,
            log::log_rewind_overtaken_rereads_without_duplicates,
            log::log_rewind_under_own_appends_rereads_without_loss,
            log::reader_behind_retention_gets_signal,
            log::concurrent_publishers_no_loss_no_duplicates,
            log::multi_stream_per_sender_order [8],
            log::log_batch_append_is_contiguous,
            faults::wakeups_interrupted_no_loss,
            faults::database_restart_no_loss [restarts],
            faults::failing_backplane_reports_errors [restarts],
            faults::lost_append_answer_delivers_everywhere_once,
            faults::cleanup_steps_run_on_their_own,
            limits::payload_sizes_cross_nodes,
            limits::payload_limit_exact_and_over,
            limits::invalid_names_rejected,
            limits::injection_names_are_opaque,
            limits::hubs_are_isolated,
            limits::namespaces_are_isolated,
            limits::concurrent_node_start,
            limits::empty_and_unicode_payloads
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __spec {
    () => {
        $crate::Spec {
            streams: 4,
            restarts: false,
        }
    };
    (restarts) => {
        $crate::Spec {
            streams: 4,
            restarts: true,
        }
    };
    ($n:literal) => {
        $crate::Spec {
            streams: $n,
            restarts: false,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __case_table {
    (; $($module:ident :: $case:ident $([$spec:tt])?),* $(,)?) => {
        static CASE_TABLE: &[$crate::Case] = &[$(
            $crate::Case {
                name: stringify!($case),
                spec: $crate::__spec!($($spec)?),
                run: |ctx| Box::pin($crate::cases::$module::$case(ctx)),
            },
        )*];
    };
}

for_each_case!(crate::__case_table,);

/// Every case of the suite, in a stable order.
pub fn cases() -> &'static [Case] {
    CASE_TABLE
}

/// Generates one `#[tokio::test]` per conformance case for a driver.
///
/// The first argument is an expression that makes an `Arc<dyn Factory>`; it is evaluated once
/// per test. A driver that cannot inject a fault some cases need lists them after `skip:`, each
/// with its reason: those tests are generated `#[ignore]`d with the reason, so `cargo test`
/// reports them as ignored, never as passed, and a generated `skip_list_names_cases` test fails
/// when the list names a case the suite does not have. Every other case runs: one that skips at
/// run time fails its test. The command-line runner reports such cases as skipped instead.
///
/// A suite that needs a server the tests cannot start names a `cfg` after `needs:`, set by the
/// test crate's build script when the server is given: without it, every case is generated
/// ignored with the reason given.
///
/// # Examples
///
/// ```
/// mod conformance {
///     backplane_conformance::suite!(std::sync::Arc::new(backplane_conformance::MemoryFactory));
/// }
///
/// mod without_restarts {
///     backplane_conformance::suite!(
///         std::sync::Arc::new(backplane_conformance::MemoryFactory),
///         skip: [
///             database_restart_no_loss = "this driver cannot stop its database",
///             failing_backplane_reports_errors = "this driver cannot stop its database",
///         ],
///     );
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! suite {
    ($factory:expr $(,)?) => {
        $crate::for_each_case!($crate::__suite_tests, ($factory));
    };
    (
        $factory:expr,
        skip: [$($skip:ident = $reason:literal),* $(,)?]
        $(, needs: $needs:ident = $why:literal)? $(,)?
    ) => {
        $crate::__suite_with_skips!(($factory) [$($skip = $reason),*] [$($needs = $why)?] $);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __suite_tests {
    (($factory:expr); $($module:ident :: $case:ident $([$spec:tt])?),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::run_test(stringify!($case), $factory).await;
            }
        )*
    };
}

/// `suite!` with a skip list (and what the suite needs). `$d` is a `$` token, for the two
/// macros it defines: one that makes a case's test, ignored when the case is on the list, and
/// one that calls it for every case of the suite.
#[doc(hidden)]
#[macro_export]
macro_rules! __suite_with_skips {
    (
        ($factory:expr)
        [$($skip:ident = $reason:literal),*]
        [$($needs:ident = $why:literal)?]
        $d:tt
    ) => {
        macro_rules! __conformance_case {
            $(
                ($skip) => {
                    #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    #[ignore = $reason]
                    async fn $skip() {
                        $crate::run_test(stringify!($skip), $factory).await;
                    }
                };
            )*
            ($d case:ident) => {
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                $(#[cfg_attr(not($needs), ignore = $why)])?
                async fn $d case() {
                    $crate::run_test(stringify!($d case), $factory).await;
                }
            };
        }
        macro_rules! __conformance_cases {
            (; $d($d module:ident :: $d case:ident $d([$d spec:tt])?),* $d(,)?) => {
                $d(__conformance_case!($d case);)*
            };
        }
        $crate::for_each_case!(__conformance_cases,);

        #[test]
        fn skip_list_names_cases() {
            $(
                assert!(
                    $crate::cases().iter().any(|c| c.name == stringify!($skip)),
                    "the skip list names {}, which is no conformance case",
                    stringify!($skip),
                );
            )*
        }
    };
}
