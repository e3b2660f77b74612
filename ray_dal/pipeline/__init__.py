"""Ray plumbing: Ray Train fitting and G, Ray Data scorers and embedders, the actors' model loading, and
joining or starting Ray. Thin: it moves tensors and ids between Ray and the math (`ray_dal.scoring`,
`ray_dal.selection`) and the data layer (`ray_dal.data`)."""
