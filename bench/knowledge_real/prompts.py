"""Prompts written for the benchmark: general requests for the fluency measure, and the question
templates of the format task.

Fluency: the base's own greedy continuation of each prompt is the reference; its negative
log-likelihood per token under an adapted model, minus the base's, says how far the adaptation moved
the model's general language away from the base (no outside data needed).
"""

from __future__ import annotations

FLUENCY = """
Tell me about the ocean.
Explain how a rainbow forms.
Write a short poem about autumn leaves.
Give me three tips for sleeping better.
What makes a good friend?
Describe a busy city street in the morning.
How do airplanes stay in the air?
Write a short story about a lost cat.
Why is exercise important?
Explain what a computer program is.
Describe the taste of a fresh strawberry.
How can I learn to cook?
What is the weather like in the desert?
Write a letter thanking a teacher.
Explain why the sky is blue.
How do plants grow?
Describe your ideal weekend.
What are the benefits of reading books?
Give me advice for a job interview.
Explain how a bicycle works.
Write a haiku about the moon.
What should I pack for a beach trip?
Describe a thunderstorm.
How do you make a cup of tea?
Why do people keep pets?
Explain what money is used for.
Tell me a fun fact about space.
How can I save money each month?
Describe a forest at night.
Write a short speech for a birthday party.
What is the difference between weather and climate?
How do fish breathe underwater?
Suggest a name for a new bakery and explain it.
Explain how vaccines help the body.
Describe the sound of the sea.
What are some good habits for students?
How does the internet work?
Write a motivational message for a runner.
Why do leaves change color in the fall?
Explain what a volcano is.
Tell me about the history of bread.
How do I take care of a houseplant?
Describe a snowy mountain village.
What is photosynthesis?
Give me a recipe idea for a quick dinner.
How do bees help flowers?
Write a short dialogue between a cat and a dog.
What is the purpose of a library?
Explain how a camera captures a picture.
Describe a market full of spices.
Why is sleep important for the brain?
How can I be more patient?
Write two sentences about the sunrise.
What do astronauts do in space?
Explain how rain forms.
How do magnets work?
Describe the perfect sandwich.
What is a good way to start learning music?
Tell me about dinosaurs.
How do trains run on tracks?
Write a short note to a neighbor.
Why do we have seasons?
Explain what electricity is.
Describe a quiet library.
What are some ways to reduce stress?
How does a refrigerator keep food cold?
Write a short poem about the rain.
What is the role of a doctor?
Explain how to plant a tree.
Describe a summer festival.
Why is water important for life?
How do birds find their way when they migrate?
Give me tips for public speaking.
Tell me about the Moon.
Write a product description for a red umbrella.
What happens when ice melts?
How do people make paper?
Describe an old castle.
Explain what a map shows.
What is kindness?
How can I improve my handwriting?
Write a short fairy tale opening.
Explain how the heart works.
Describe a train journey through the countryside.
Why do we need bridges?
How do you make friends in a new city?
Tell me about the planet Mars.
Write a thank-you note for a gift.
What is a healthy breakfast?
Explain what gravity does.
Describe the smell of fresh bread.
How do ships float?
Give me a tip for learning a new language.
What is the job of a firefighter?
Write a short poem about friendship.
How do clocks measure time?
Describe a lake at sunset.
Explain how to ride a bicycle safely.
Why do people travel?
What are clouds made of?
Tell me about the life of an ant.
Write an invitation to a picnic.
How does a solar panel work?
Describe a rainy afternoon at home.
What is the purpose of art?
How do you write a good essay?
Explain the water cycle.
Describe a crowded train station.
Why should we recycle?
How does the human eye see colors?
Write a short story about a robot who learns to paint.
What is a good way to spend a rainy day?
Explain how wind is created.
Describe a garden in spring.
What do farmers do in winter?
How can I stay focused while studying?
Tell me about whales.
Write a short review of an imaginary restaurant.
Why do stars twinkle?
What is a democracy?
Explain how soap cleans our hands.
Describe a walk on the beach.
How do you plan a trip?
What makes a story interesting?
Write a short poem about the stars.
Explain how a lighthouse helps ships.
Describe the first day of school.
Why do we dream?
How do cats communicate?
Give me ideas for a family game night.
What is the job of a pilot?
Explain how a telescope works.
Describe a bakery early in the morning.
How do mountains form?
Write a short motivational quote.
What is teamwork?
How can I be a better listener?
Tell me about the Arctic.
Explain how to make a paper airplane.
Describe an autumn morning.
Why is the ocean salty?
What are the parts of a flower?
Write a short letter to your future self.
How do elephants live?
Explain what a calendar is for.
Describe a campfire under the stars.
What is the best way to learn math?
How do earthquakes happen?
Write a short poem about a river.
What is good manners?
Explain how a battery stores energy.
Describe a painting of the sea.
How do you stay safe in the sun?
Tell me about the history of the wheel.
What makes a city good to live in?
Explain how sound travels.
Describe a day at the zoo.
Why do people play sports?
How can I organize my desk?
Write a short story that begins with a knock at the door.
What is an ecosystem?
Explain how bread rises.
Describe the feeling of finishing a long race.
How do owls hunt at night?
Give me advice for a first-time gardener.
What does a scientist do?
Write a short poem about the wind.
Why is it important to drink water?
Explain how to tie a knot.
Describe an orchestra warming up.
How do penguins survive the cold?
What is a good hobby for winter?
Tell me about coral reefs.
Write a short welcome message for a new club member.
How does a compass work?
Describe a sunny picnic in the park.
What is honesty?
Explain how the Moon affects the tides.
How do you cook rice?
Describe a small fishing boat.
Why are forests important?
Write a short poem about a city at night.
How can I make my mornings less rushed?
What is the job of a teacher?
Explain what a museum does.
Describe the view from a high mountain.
How do frogs grow?
Tell me about the invention of printing.
What should I know before adopting a dog?
Write a short ad for a lemonade stand.
Explain why we should wash fruit.
Describe a windy day by the sea.
How do spiders make webs?
What is curiosity?
"""

# The format task: the reply is the base's own answer wrapped as {"answer": ...}. Each template gets
# each of its (comma-separated) fillers; templates are split into train / validation / test, so the format is
# tested on kinds of questions never seen in training.
FORMAT_TEMPLATES = {
    "train": {
        "Give me a synonym for {}.": "happy, big, fast, smart, cold, angry, quiet, bright, tired, rich, brave, easy",
        "Name an animal that lives in the {}.": "ocean, desert, jungle, arctic, forest, river, savanna, mountains, swamp, city, grassland, cave",
        "What is a {} used for?": "hammer, ladder, spoon, compass, thermometer, broom, needle, microscope, kettle, shovel, stapler, umbrella",
        "Name a food that is {}.": "sweet, spicy, sour, salty, crunchy, green, red, cold, bitter, soft, yellow, round",
        "Suggest a name for a pet {}.": "dog, cat, fish, parrot, rabbit, turtle, hamster, horse, snake, frog, goat, mouse",
        "Give me a word that rhymes with {}.": "cat, tree, light, rain, moon, star, day, blue, cake, bell, fun, night",
        "What is the main ingredient of {}?": "bread, guacamole, hummus, pesto, tofu, cheese, wine, chocolate, popcorn, jam, butter, ketchup",
        "Name a famous {}.": "scientist, painter, composer, explorer, poet, inventor, athlete, philosopher, queen, emperor, astronaut, architect",
    },
    "val": {
        "Name a job that needs a {}.": "uniform, computer, truck, microphone, brush, camera, ladder, whistle, microscope, stethoscope, knife, map",
        "Name something you can find in a {}.": "kitchen, garage, classroom, hospital, library, garden, museum, bakery, forest, supermarket, office, beach",
    },
    "test": {
        "What is a good gift for a {}?": "child, teacher, gardener, musician, runner, painter, cook, reader, traveler, baby, grandmother, student",
        "Name a tool used by a {}.": "carpenter, chef, doctor, painter, gardener, plumber, dentist, tailor, mechanic, farmer, barber, sculptor",
        "Give me an adjective that describes {}.": "summer, winter, the sea, a mountain, a city, a lion, a cloud, a forest, honey, ice, fire, silk",
        "Name a game that people play {}.": "outdoors, indoors, online, at parties, with cards, with a ball, on the beach, in the snow, with dice, at school, in teams, alone",
    },
}


def fluency_prompts() -> list[str]:
    return [line.strip() for line in FLUENCY.strip().splitlines() if line.strip()]


def format_prompts(split: str) -> list[str]:
    """The questions of one split of the format task (every template with each of its fillers)."""
    return [template.format(f.strip()) for template, fillers in FORMAT_TEMPLATES[split].items()
            for f in fillers.split(",")]
