//! The reference chat hub at `/hubs/chat`, built with the [`Hub`] API.
//!
//! | method | effect |
//! |---|---|
//! | `SendMessage(message)` | every connection receives `ReceiveMessage(user, message)` |
//! | `JoinGroup(group)` | the group receives `UserJoined(group, user)` |
//! | `LeaveGroup(group)` | the group receives `UserLeft(group, user)` |
//! | `SendToGroup(group, message)` | the group receives `ReceiveGroupMessage(group, user, message)` |
//! | `SendToUser(user, message)` | every connection of that user receives `ReceiveNotification(fromUser, message)`, durably: an offline user receives it once, on their next connect |
//! | `GetOnlineUsers()` | returns the ids of the users connected to the hub, on any node |
//! | `UploadMessages(stream)` | a client-to-server stream: every item goes to every connection as `ReceiveMessage(user, item)`, in order; the result is how many were sent |
//! | `Ask(user, question)` | one connection of that user is asked `Ask(fromUser, question)` and the value its handler returns is the caller's result (a SignalR client result, on any node) |

use std::time::Duration;

use backplane_core::{GroupName, UserId};
use serde_json::{Value, json};

use crate::hub::{Context, Hub, HubError};

/// How long a direct message waits for an offline user.
pub const DIRECT_MESSAGE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long `Ask` waits for the asked client's answer.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(30);

/// The caller's display name: its user id, or its connection id when anonymous.
fn who(ctx: &Context) -> String {
    ctx.user()
        .map_or_else(|| ctx.connection_id().to_string(), ToString::to_string)
}

fn group(name: String) -> Result<GroupName, HubError> {
    GroupName::new(name).map_err(HubError::from)
}

/// The chat hub.
pub fn hub() -> Hub {
    // "chat" is a valid hub name.
    let builder = match Hub::builder("chat") {
        Ok(builder) => builder,
        Err(err) => unreachable!("the chat hub's name is valid: {err}"),
    };
    builder
        .method("SendMessage", 1, |ctx, args| async move {
            let message: String = args.get(0)?;
            ctx.clients()
                .all()
                .send("ReceiveMessage", vec![json!(who(&ctx)), json!(message)])
                .await?;
            Ok(Value::Null)
        })
        .upload(
            "UploadMessages",
            0,
            1,
            |ctx, _args, mut streams| async move {
                let mut sent = 0u64;
                if let Some(messages) = streams.first_mut() {
                    while let Some(message) = messages.next_as::<String>().await? {
                        ctx.clients()
                            .all()
                            .send("ReceiveMessage", vec![json!(who(&ctx)), json!(message)])
                            .await?;
                        sent += 1;
                    }
                }
                Ok(json!(sent))
            },
        )
        .method("JoinGroup", 1, |ctx, args| async move {
            let group = group(args.get(0)?)?;
            ctx.groups().add(ctx.connection_id(), &group).await?;
            ctx.clients()
                .group(group.clone())
                .send("UserJoined", vec![json!(group.as_str()), json!(who(&ctx))])
                .await?;
            Ok(Value::Null)
        })
        .method("LeaveGroup", 1, |ctx, args| async move {
            let group = group(args.get(0)?)?;
            ctx.groups().remove(ctx.connection_id(), &group).await?;
            ctx.clients()
                .group(group.clone())
                .except([ctx.connection_id().clone()])
                .send("UserLeft", vec![json!(group.as_str()), json!(who(&ctx))])
                .await?;
            Ok(Value::Null)
        })
        .method("SendToGroup", 2, |ctx, args| async move {
            let group = group(args.get(0)?)?;
            let message: String = args.get(1)?;
            ctx.clients()
                .group(group.clone())
                .send(
                    "ReceiveGroupMessage",
                    vec![json!(group.as_str()), json!(who(&ctx)), json!(message)],
                )
                .await?;
            Ok(Value::Null)
        })
        .method("SendToUser", 2, |ctx, args| async move {
            let user = UserId::new(args.get::<String>(0)?).map_err(HubError::from)?;
            let message: String = args.get(1)?;
            ctx.clients()
                .user(user)
                .durable(DIRECT_MESSAGE_TTL)
                .send(
                    "ReceiveNotification",
                    vec![json!(who(&ctx)), json!(message)],
                )
                .await?;
            Ok(Value::Null)
        })
        .method("GetOnlineUsers", 0, |ctx, _args| async move {
            let users: Vec<String> = ctx
                .online_users()
                .await?
                .into_iter()
                .map(|u| u.to_string())
                .collect();
            Ok(json!(users))
        })
        .method("Ask", 2, |ctx, args| async move {
            let user = UserId::new(args.get::<String>(0)?).map_err(HubError::from)?;
            let question: String = args.get(1)?;
            let connections = ctx
                .node()
                .backplane()
                .user_connections(ctx.hub(), &user)
                .await
                .map_err(HubError::from)?;
            let Some(first) = connections.into_iter().next() else {
                return Err(HubError::new(format!("{user} is not connected")));
            };
            ctx.clients()
                .client(first.id)
                .invoke("Ask", vec![json!(who(&ctx)), json!(question)], ASK_TIMEOUT)
                .await
        })
        .build()
}
