"""The Storage layer: one root folder for every byte Loom keeps, one place that opens SQLite,
small stores (KV, episodes, facts + vectors, router history, audit, blobs), a group-commit writer
shared by everything in a process, the data lifecycle (hot > warm > cold > archive > delete),
disk budgets, and the cold tier's compressed faiss index. Plain Python; the ROS node lives in
loom_ros/storage/ros2/. See docs/storage.md."""
