"""Everything `mesh` owns: its objects as data (spec), the shared router and stuntman and their life
(shared), the route list (routes), what clean and status know of meshes (clean), and auto-header marks."""
