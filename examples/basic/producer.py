"""Enqueues a few tasks (Redis: $FLUMEQ_URL, else redis://127.0.0.1:6379/0)."""

import sys

import flumeq


def produce(url: "str | None" = None) -> list[flumeq.TaskInfo]:
    with flumeq.Client(url) as client:
        infos = [
            client.enqueue(
                "email:send",
                {"to": f"user{n}@example.com", "subject": "Welcome"},
                queue="critical",
                max_retry=5,
                timeout=30,
            )
            for n in range(5)
        ]
        infos += client.enqueue_many(
            [("image:resize", {"path": f"/img/{n}.png", "size": [128, 128]}) for n in range(20)]
        )
        return infos


if __name__ == "__main__":
    print(f"enqueued {len(produce(sys.argv[1] if len(sys.argv) > 1 else None))} tasks")
