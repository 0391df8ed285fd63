"""What `exchange` changes in the cluster and how it is undone: the Service's selector taken over and
guarded, the kt-lock, scale mode's replicas, and which Service a TARGET means."""
